package main

// Issue 4, crash safety of the cache as operators run it: `pullsecret serve`
// is killed with SIGKILL while it fills a blob from the upstream, and is
// started again on the same home. Nothing partial may ever be served: the
// client of the dead process sees a failed transfer, the restarted process
// cleans the dead one's spool, fetches the blob afresh and serves verified
// bytes.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

// stallOnce makes the upstream send the first GET of one blob only up to
// held bytes and then stall until the proxy hangs up, or until release is
// closed (when set): a fill caught in the middle. Later requests are served
// normally.
type stallOnce struct {
	path    *regexp.Regexp
	held    int64
	used    atomic.Bool
	stalled chan struct{} // closed once the held bytes are out
	release chan struct{} // nil: stall for good
}

func (s *stallOnce) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !s.path.MatchString(r.URL.Path) || s.used.Swap(true) {
			next.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(&stallWriter{ResponseWriter: w, left: s.held, ctx: r.Context(), stalled: s.stalled, release: s.release}, r)
	})
}

type stallWriter struct {
	http.ResponseWriter
	left    int64
	ctx     context.Context
	stalled chan struct{}
	release chan struct{}
}

func (w *stallWriter) Write(p []byte) (int, error) {
	if int64(len(p)) < w.left {
		n, err := w.ResponseWriter.Write(p)
		w.left -= int64(n)
		return n, err
	}
	n, err := w.ResponseWriter.Write(p[:w.left])
	w.left -= int64(n)
	if err != nil {
		return n, err
	}
	// Out to the proxy now, not when a buffer fills.
	_ = http.NewResponseController(w.ResponseWriter).Flush()
	close(w.stalled)
	select {
	case <-w.release: // a nil channel never fires
	case <-w.ctx.Done(): // the proxy's connection closed: it was killed
		return n, w.ctx.Err()
	}
	w.left = math.MaxInt64
	m, err := w.ResponseWriter.Write(p[n:])
	return n + m, err
}

// stallingUpstream starts an upstream behind stall with one random blob of
// size bytes in team/app (its seed picks the bytes), stores its password
// as acme's pull secret "up" and returns a pull token of acme.
func stallingUpstream(ctx context.Context, t *testing.T, e *env, stall *stallOnce, size int64, seed uint64, opts ...registry.Option) (*registry.Registry, v1.Hash, string) {
	t.Helper()
	opts = append(opts, registry.WithHTPasswd(map[string]string{"bot": canary}), registry.WithHandlerWrapper(stall.wrap))
	up, err := registry.Start(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Close() })
	d, err := up.SeedBlob(ctx, "team/app", size, registry.RandSeed(seed))
	if err != nil {
		t.Fatal(err)
	}
	e.must(canary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(e.must("", "token", "create", "--project", "acme", "--scope", "pull"))
	return up, d, tok
}

// blobGET is one GET of a blob through the proxy, hashed as it streams.
type blobGET struct {
	status int
	n      int64
	sum    string // sha256:<hex> of the bytes received
	err    error  // the body ended early
}

// getBlob GETs url with the project token and streams the body into
// sha256; got (when not nil) counts the bytes as they arrive.
func getBlob(ctx context.Context, url, tok string, got *atomic.Int64) blobGET {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return blobGET{err: err}
	}
	req.SetBasicAuth("ci", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return blobGET{err: err}
	}
	defer resp.Body.Close()
	h := sha256.New()
	var dst io.Writer = h
	if got != nil {
		dst = io.MultiWriter(h, countWriter{got})
	}
	n, err := io.Copy(dst, resp.Body)
	return blobGET{status: resp.StatusCode, n: n, sum: "sha256:" + hex.EncodeToString(h.Sum(nil)), err: err}
}

type countWriter struct{ n *atomic.Int64 }

func (c countWriter) Write(p []byte) (int, error) { c.n.Add(int64(len(p))); return len(p), nil }

// filesUnder lists the regular files below dir with their sizes.
func filesUnder(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				out[p] = fi.Size()
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// spoolFills are the spool files of fills (not the instances' lock files).
func spoolFills(t *testing.T, spool string) map[string]int64 {
	t.Helper()
	fills := map[string]int64{}
	for p, n := range filesUnder(t, spool) {
		if strings.HasPrefix(filepath.Base(p), "fill-") {
			fills[p] = n
		}
	}
	return fills
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// TestServeKilledDuringFill: SIGKILL while a blob fills; on restart the
// cache opens cleanly, the dead process's spool is gone, nothing partial is
// served, and the blob is fetched afresh and verified.
func TestServeKilledDuringFill(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs pullsecret serve")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e := newEnv(t) // at cleanup: the canary in no output and no file of the home
	bin := testbin.Build(t, "pullsecret")

	const size = 32 << 20
	stall := &stallOnce{path: regexp.MustCompile(`/blobs/sha256:`), held: size / 2, stalled: make(chan struct{})}
	up, d, tok := stallingUpstream(ctx, t, e, stall, size, 41, registry.WithFilesystem(t.TempDir()))

	cacheRoot := filepath.Join(e.home, "cache")
	spool := filepath.Join(cacheRoot, "_spool")
	final := filepath.Join(cacheRoot, "blobs", "sha256", d.Hex[:2], d.Hex, "data")
	host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
	config := fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\nlog: {level: debug}\n", up.Host())
	env := []string{"PULLSECRET_HOME=" + e.home}
	blobURL := "http://" + host + "/v2/up/team/app/blobs/" + d.String()
	var servers []*testbin.Server
	// Registered before the servers start, so it runs after they stopped:
	// their whole logs.
	t.Cleanup(func() {
		for i, s := range servers {
			logs := s.Logs()
			for _, f := range append(canaryForms(), tok) {
				if strings.Contains(logs, f) {
					t.Errorf("serve #%d logged a credential (%.12s...):\n%s", i+1, f, logs)
				}
			}
		}
	})

	// 1. A cold pull; the upstream stalls half way.
	srv := testbin.ServeAt(t, bin, host, env, config)
	servers = append(servers, srv)
	var got atomic.Int64
	first := make(chan blobGET, 1)
	go func() { first <- getBlob(ctx, blobURL, tok, &got) }()
	select {
	case <-stall.stalled:
	case r := <-first:
		t.Fatalf("the pull ended before the upstream stalled: %+v\n%s", r, srv.Logs())
	case <-ctx.Done():
		t.Fatalf("the upstream never sent the first half\n%s", srv.Logs())
	}
	// Wait until the fill is visibly in flight: bytes in the spool and at
	// the client.
	var debris map[string]int64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		debris = spoolFills(t, spool)
		var spooled int64
		for _, n := range debris {
			spooled += n
		}
		if spooled >= size/4 && got.Load() >= size/4 {
			t.Logf("spool holds %d bytes, the client got %d; killing the server", spooled, got.Load())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fill not under way after 30s: spool %v, client %d bytes\n%s", debris, got.Load(), srv.Logs())
		}
	}

	// 2. SIGKILL mid-fill.
	srv.Kill(t)
	r := <-first
	if r.status != http.StatusOK {
		t.Fatalf("the interrupted pull: status %d, %v", r.status, r.err)
	}
	if r.err == nil || r.n >= size || r.sum == d.String() {
		t.Fatalf("the interrupted pull ended cleanly: %d of %d bytes, err %v", r.n, size, r.err)
	}
	t.Logf("the interrupted client got %d of %d bytes, then: %v", r.n, size, r.err)
	if _, err := os.Stat(final); !os.IsNotExist(err) {
		t.Fatalf("the cache entry exists after a kill mid-fill (stat: %v)", err)
	}
	if left := spoolFills(t, spool); len(left) == 0 {
		t.Fatal("the killed process left no spool file: it was not killed mid-fill")
	}
	deadInstances := map[string]bool{}
	for p := range debris {
		deadInstances[filepath.Base(filepath.Dir(p))] = true
	}
	// The upstream logs the killed fetch once it sees the connection drop:
	// wait for that, or it would count as a fetch after the restart.
	for deadline := time.Now().Add(15 * time.Second); up.BlobFetches(d.String()) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the upstream never logged the interrupted fetch")
		}
		time.Sleep(10 * time.Millisecond)
	}
	fetchesBefore := up.BlobFetches(d.String())
	restart := time.Now()

	// 3. Restart on the same home and port.
	srv = testbin.ServeAt(t, bin, host, env, config)
	servers = append(servers, srv)
	resp, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/readyz after the restart: %d\n%s", resp.StatusCode, srv.Logs())
	}
	if left := spoolFills(t, spool); len(left) != 0 {
		t.Errorf("spool files left after the restart: %v", left)
	}
	ents, err := os.ReadDir(spool)
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		if deadInstances[ent.Name()] {
			t.Errorf("the killed instance's spool folder %s is still there", ent.Name())
		}
	}
	if !strings.Contains(srv.Logs(), "removed stale spool of a stopped process") {
		t.Errorf("the restarted server did not report cleaning the stale spool:\n%s", srv.Logs())
	}
	if _, err := os.Stat(final); !os.IsNotExist(err) {
		t.Fatalf("a cache entry appeared at the restart (stat: %v)", err)
	}

	// 4. HEAD: the size of the whole blob, no body.
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, blobURL, nil)
	req.SetBasicAuth("ci", tok)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Length") != strconv.Itoa(size) || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD after the restart: %d, Content-Length %q, digest %q", resp.StatusCode, resp.Header.Get("Content-Length"), resp.Header.Get("Docker-Content-Digest"))
	}

	// 5. GET: a fresh, complete fill from the upstream, verified.
	r = getBlob(ctx, blobURL, tok, nil)
	if r.err != nil || r.status != http.StatusOK || r.n != size || r.sum != d.String() {
		t.Fatalf("GET after the restart: status %d, %d bytes, %s, err %v\n%s", r.status, r.n, r.sum, r.err, srv.Logs())
	}
	if n := up.BlobFetches(d.String()); n != fetchesBefore+1 {
		t.Fatalf("upstream blob fetches: %d before the restart, %d after; want one new fetch", fetchesBefore, n)
	}
	fresh := false
	for _, q := range up.Requests() {
		if q.Method == http.MethodGet && strings.HasSuffix(q.Path, "/blobs/"+d.String()) && q.Time.After(restart) {
			if q.Status != http.StatusOK || q.Bytes != size || q.Aborted {
				t.Errorf("upstream GET after the restart: status %d, %d bytes, aborted %v", q.Status, q.Bytes, q.Aborted)
			}
			fresh = true
		}
	}
	if !fresh {
		t.Fatal("no GET of the blob reached the upstream after the restart: the blob did not come from a fresh fill")
	}

	// 6. The fill is committed, verified, and later pulls come from it.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(final); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the blob was not committed to the cache after a clean pull\n%s", srv.Logs())
		}
	}
	if sum := sha256File(t, final); sum != d.String() {
		t.Fatalf("the cache entry hashes to %s, want %s", sum, d)
	}
	r = getBlob(ctx, blobURL, tok, nil)
	if r.err != nil || r.status != http.StatusOK || r.n != size || r.sum != d.String() {
		t.Fatalf("warm GET after the restart: status %d, %d bytes, %s, err %v", r.status, r.n, r.sum, r.err)
	}
	if n := up.BlobFetches(d.String()); n != fetchesBefore+1 {
		t.Fatalf("the warm pull went upstream: %d fetches, want %d", n, fetchesBefore+1)
	}
	if left := spoolFills(t, spool); len(left) != 0 {
		t.Errorf("spool files left after the fill committed: %v", left)
	}
}
