package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/registry"
)

// cachedPX is a proxy fixture with the caching fetcher in front of the
// direct one.
type cachedPX struct {
	*pxFixture
	cache   *cache.Cache
	records *cache.MemoryAccessRecords
}

func newCachedPX(t testing.TB, o CachedOptions, opts ...pxOption) *cachedPX {
	t.Helper()
	tagTTL := o.TagTTL
	if tagTTL <= 0 {
		tagTTL = time.Minute
	}
	c, err := cache.OpenFilesystem(context.Background(), t.TempDir(), cache.WithTagTTL(tagTTL))
	if err != nil {
		t.Fatal(err)
	}
	records := cache.NewAccessRecords()
	reg := prometheus.NewRegistry()
	o.Registerer = reg
	f := newPXWith(t, []Option{WithMetricsRegistry(reg), WithFetcher(func(next Fetcher) Fetcher {
		return NewCachedFetcher(next, c, records, o)
	})}, opts...)
	t.Cleanup(func() { c.Close(); records.Close() })
	return &cachedPX{pxFixture: f, cache: c, records: records}
}

func (f *cachedPX) digestRef(repo string, d v1.Hash) name.Digest {
	f.t.Helper()
	r, err := name.NewDigest(f.host+"/"+repo+"@"+d.String(), name.Insecure)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

// pullLayer pulls a blob by digest with ggcr, which verifies its digest.
func (f *cachedPX) pullLayer(tok, repo string, d v1.Hash) (int64, error) {
	l, err := remote.Layer(f.digestRef(repo, d), f.client(tok)...)
	if err != nil {
		return 0, err
	}
	rc, err := l.Compressed()
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	return io.Copy(io.Discard, rc)
}

// pullImage pulls an image by reference and reads every layer (verified).
func (f *cachedPX) pullImage(tok, ref string) (v1.Hash, error) {
	img, err := remote.Image(f.ref(ref), f.client(tok)...)
	if err != nil {
		return v1.Hash{}, err
	}
	d, err := img.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	layers, err := img.Layers()
	if err != nil {
		return v1.Hash{}, err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return v1.Hash{}, err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return v1.Hash{}, err
		}
	}
	return d, nil
}

func cachedUpstream(t testing.TB) *registry.Registry {
	return pxUpstream(t, false, registry.WithFilesystem(t.TempDir()))
}

// TestCachedCoalescedFill: 50 concurrent clients pull one cold blob; the
// upstream serves it exactly once, every client gets verified bytes, and
// Range requests made during the fill get the right slices.
func TestCachedCoalescedFill(t *testing.T) {
	t.Parallel()
	up := cachedUpstream(t)
	f := newCachedPX(t, CachedOptions{}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	const size = 16 << 20
	d, err := up.SeedBlob(f.ctx, "team/app", size, registry.RandSeed(11))
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := registry.RandomBlob(11, size).Compressed()
	all, _ := io.ReadAll(rc)
	tok := f.token("acme", ScopePull)

	var wg sync.WaitGroup
	errs := make(chan error, 60)
	start := make(chan struct{})
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			n, err := f.pullLayer(tok, "up/team/app", d)
			if err == nil && n != size {
				err = fmt.Errorf("got %d bytes", n)
			}
			errs <- err
		}()
	}
	for i := 0; i < 5; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			first := int64(i) * (size / 5)
			last := first + 1<<20 - 1
			resp := f.get("/v2/up/team/app/blobs/"+d.String(), tok, "Range", fmt.Sprintf("bytes=%d-%d", first, last))
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			switch {
			case err != nil:
				errs <- err
			case resp.StatusCode != http.StatusPartialContent:
				errs <- fmt.Errorf("range: status %d", resp.StatusCode)
			case !bytes.Equal(b, all[first:last+1]):
				errs <- fmt.Errorf("range %d-%d: wrong bytes", first, last)
			default:
				errs <- nil
			}
		}(i)
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := up.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream served the blob %d times, want 1", n)
	}
	// Warm: whole and ranged reads of the committed entry.
	if n, err := f.pullLayer(tok, "up/team/app", d); err != nil || n != size {
		t.Fatalf("warm pull: %d bytes, %v", n, err)
	}
	for _, rng := range []struct {
		h           string
		first, last int
	}{{"bytes=100-199", 100, 199}, {"bytes=-10", size - 10, size - 1}, {fmt.Sprintf("bytes=%d-", size-5), size - 5, size - 1}} {
		resp := f.get("/v2/up/team/app/blobs/"+d.String(), tok, "Range", rng.h)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(b, all[rng.first:rng.last+1]) ||
			resp.Header.Get("Content-Range") != fmt.Sprintf("bytes %d-%d/%d", rng.first, rng.last, size) {
			t.Fatalf("warm %s: %d %q, %d bytes", rng.h, resp.StatusCode, resp.Header.Get("Content-Range"), len(b))
		}
	}
	resp := f.get("/v2/up/team/app/blobs/"+d.String(), tok, "Range", fmt.Sprintf("bytes=%d-", size))
	f.readAll(resp)
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable {
		t.Fatalf("range past the end: %d", resp.StatusCode)
	}
	if n := up.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream served the blob %d times after warm reads, want 1", n)
	}
}

// TestCachedCorruptOnce: the upstream corrupts the blob once; every waiter
// errors, nothing is cached, and the next pull succeeds.
func TestCachedCorruptOnce(t *testing.T) {
	t.Parallel()
	up := cachedUpstream(t)
	f := newCachedPX(t, CachedOptions{}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	const size = 4 << 20
	d, err := up.SeedBlob(f.ctx, "team/app", size, registry.RandSeed(12))
	if err != nil {
		t.Fatal(err)
	}
	tok := f.token("acme", ScopePull)
	// Prove access first so the concurrent pulls all join one fill.
	if resp := f.do(http.MethodHead, "/v2/up/team/app/blobs/"+d.String(), tok, nil); resp.StatusCode != 200 {
		t.Fatalf("HEAD: %d", resp.StatusCode)
	}
	up.Faults().MustAdd(http.MethodGet, "/blobs/"+d.String(), registry.Corrupt(size/2), registry.Times(1))
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok := 0
	start := make(chan struct{})
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if _, err := f.pullLayer(tok, "up/team/app", d); err == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	// Clients that arrived after the failed fill start a fresh one and
	// may succeed; at least the first fill's waiters must all have failed,
	// and no client may ever get bad bytes (ggcr verifies).
	if ok == 10 {
		t.Fatal("every client succeeded although the upstream corrupted the blob")
	}
	if n, err := f.pullLayer(tok, "up/team/app", d); err != nil || n != size {
		t.Fatalf("pull after the corruption: %d bytes, %v", n, err)
	}
	// The verified spool is committed just after its last byte is out.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := f.cache.Stat(f.ctx, cache.KindBlob, toDigest(d))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("blob not cached after a clean pull: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCachedUpstreamDown: with the upstream stopped, cached tags and digests
// still pull; a tag never cached gives a clear error.
func TestCachedUpstreamDown(t *testing.T) {
	t.Parallel()
	up := cachedUpstream(t)
	f := newCachedPX(t, CachedOptions{TagTTL: time.Millisecond}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	img, err := up.SeedRandom(f.ctx, "team/app", "v1", registry.Layers(2), registry.LayerSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := up.SeedRandom(f.ctx, "team/app", "v2", registry.Layers(1)); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	tok := f.token("acme", ScopePull)
	if _, err := f.pullImage(tok, "up/team/app:v1"); err != nil {
		t.Fatal(err)
	}
	up.Close()
	time.Sleep(5 * time.Millisecond)
	got, err := f.pullImage(tok, "up/team/app:v1")
	if err != nil {
		t.Fatalf("pull of a cached tag with the upstream down: %v", err)
	}
	if got != want {
		t.Fatalf("digest %s, want %s", got, want)
	}
	if _, err := f.pullImage(tok, "up/team/app@"+want.String()); err != nil {
		t.Fatalf("pull by digest with the upstream down: %v", err)
	}
	resp := f.get("/v2/up/team/app/manifests/v2", tok)
	body := f.readAll(resp)
	if resp.StatusCode < 500 {
		t.Fatalf("never-cached tag with the upstream down: %d %s", resp.StatusCode, body)
	}
	if code, _ := errorCode(body); code != CodeUnavailable {
		t.Fatalf("never-cached tag: code %q, body %s", code, body)
	}
}

// TestCachedTenantIsolation: project B, without a credential for the
// private repository, gets nothing that A cached, by digest or tag; once
// B's own secret is added, B pulls from the cache and the upstream sees
// only the access check.
func TestCachedTenantIsolation(t *testing.T) {
	t.Parallel()
	up := cachedUpstream(t)
	f := newCachedPX(t, CachedOptions{}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	img, err := up.SeedRandom(f.ctx, "team/app", "v1", registry.Layers(2), registry.LayerSize(256<<10))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	layers, _ := img.Layers()
	tokA := f.token("acme", ScopePull)
	if _, err := f.pullImage(tokA, "up/team/app:v1"); err != nil {
		t.Fatal(err)
	}
	tokB := f.token("beta", ScopePull)
	for _, l := range layers {
		d, _ := l.Digest()
		if _, err := f.pullLayer(tokB, "up/team/app", d); err == nil {
			t.Fatalf("project B got A's cached blob %s", d)
		}
		resp := f.get("/v2/up/team/app/blobs/"+d.String(), tokB)
		f.readAll(resp)
		if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("B blob by digest: %d", resp.StatusCode)
		}
	}
	for _, ref := range []string{"up/team/app:v1", "up/team/app@" + want.String()} {
		if _, err := remote.Image(f.ref(ref), f.client(tokB)...); err == nil {
			t.Fatalf("project B got A's cached manifest %s", ref)
		}
	}
	resp := f.get("/v2/up/team/app/manifests/"+want.String(), tokB)
	f.readAll(resp)
	if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("B manifest by digest: %d", resp.StatusCode)
	}

	m := f.readAll(f.get("/metrics", ""))
	if !strings.Contains(m, `pullsecret_cache_access_checks_total{project="beta",result="denied"`) &&
		!strings.Contains(m, `pullsecret_cache_access_checks_total{project="beta",result="failed"`) {
		t.Errorf("no denied access check of project beta in /metrics")
	}

	f.addSecret("beta", "up", up.Host(), pxUser, pxCanary)
	got, err := f.pullImage(tokB, "up/team/app:v1")
	if err != nil {
		t.Fatalf("B with its own secret: %v", err)
	}
	if got != want {
		t.Fatalf("digest %s, want %s", got, want)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		if n := up.BlobFetches(d.String()); n != 1 {
			t.Fatalf("upstream served layer %s %d times, want 1", d, n)
		}
	}
}

// TestCachedRevokedCredential: after the password changes upstream, the
// next pull after access_ttl is denied although everything is cached.
func TestCachedRevokedCredential(t *testing.T) {
	t.Parallel()
	up := cachedUpstream(t)
	const ttl = 50 * time.Millisecond
	f := newCachedPX(t, CachedOptions{AccessTTL: ttl, TagTTL: time.Hour}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	img, err := up.SeedRandom(f.ctx, "team/app", "v1", registry.Layers(1), registry.LayerSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	tok := f.token("acme", ScopePull)
	if _, err := f.pullImage(tok, "up/team/app:v1"); err != nil {
		t.Fatal(err)
	}
	if err := up.SetPassword(pxUser, "changed-"+pxCanary[:4]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * ttl)
	if _, err := f.pullImage(tok, "up/team/app:v1"); err == nil {
		t.Fatal("pull by tag succeeded with a revoked credential")
	}
	for _, path := range []string{"/v2/up/team/app/manifests/v1", "/v2/up/team/app/manifests/" + want.String(), "/v2/up/team/app/blobs/" + ld.String()} {
		resp := f.get(path, tok)
		body := f.readAll(resp)
		if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s with a revoked credential: %d %s", path, resp.StatusCode, body)
		}
	}
}

func TestCacheConfig(t *testing.T) {
	cfg, err := ParseConfig([]byte("listen: 127.0.0.1:0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c := cfg.Cache; !c.Enabled || c.Driver != "filesystem" || c.TagTTL != time.Minute || c.AccessTTL != 10*time.Minute {
		t.Fatalf("defaults: %+v", c)
	}
	cfg, err = ParseConfig([]byte(`cache:
  enabled: false
  root: /var/cache/ps
  tag_ttl: 30s
  access_ttl: 2m
  gc: {max_size: 10GiB, older_than: 168h, interval: 1h}
`))
	if err != nil {
		t.Fatal(err)
	}
	want := CacheConfig{Enabled: false, Driver: "filesystem", Root: "/var/cache/ps", TagTTL: 30 * time.Second, AccessTTL: 2 * time.Minute,
		GC: CacheGCConfig{MaxSize: 10 << 30, OlderThan: 168 * time.Hour, Interval: time.Hour}}
	if !reflect.DeepEqual(cfg.Cache, want) {
		t.Fatalf("got %+v, want %+v", cfg.Cache, want)
	}
	for _, bad := range []string{"cache: {driver: s3}\n", "cache: {tag_ttl: -1s}\n", "cache: {nope: 1}\n", "cache: {gc: {interval: -1m}}\n"} {
		if _, err := ParseConfig([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
