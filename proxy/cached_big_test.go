package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/registry"
)

// bigGate holds the upstream's first GET of a blob at a byte offset until
// released, so a test knows the fill is in flight when it starts more
// clients.
type bigGate struct {
	at      int64
	used    atomic.Bool
	held    chan struct{} // closed when the first at bytes are out
	release chan struct{}
}

func newBigGate(at int64) *bigGate {
	return &bigGate{at: at, held: make(chan struct{}), release: make(chan struct{})}
}

func (g *bigGate) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/") || g.used.Swap(true) {
			next.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(&bigGateWriter{ResponseWriter: w, g: g, left: g.at, ctx: r.Context()}, r)
	})
}

type bigGateWriter struct {
	http.ResponseWriter
	g    *bigGate
	left int64 // bytes before the gate; -1 once past it
	ctx  context.Context
}

func (w *bigGateWriter) Write(p []byte) (int, error) {
	if w.left < 0 || int64(len(p)) < w.left {
		n, err := w.ResponseWriter.Write(p)
		if w.left >= 0 {
			w.left -= int64(n)
		}
		return n, err
	}
	n, err := w.ResponseWriter.Write(p[:w.left])
	if err != nil {
		return n, err
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
	w.left = -1
	close(w.g.held)
	select {
	case <-w.g.release:
	case <-w.ctx.Done():
		return n, w.ctx.Err()
	}
	m, err := w.ResponseWriter.Write(p[n:])
	return n + m, err
}

// bigRange is a Range request and the bytes it must get.
type bigRange struct {
	header      string
	first, last int64
	want        []byte
}

// TestCachedCoalescedFillBig is TestCachedCoalescedFill at 64 MiB, with
// late joiners: 50 clients pull one cold blob at once; once the upstream
// is half way, more whole and ranged requests arrive mid-fill. The
// upstream sends the blob exactly once, every client gets bytes whose
// sha256 is the digest, ranges below the fill point are answered before
// the fill ends, and every range gets its exact slice.
func TestCachedCoalescedFillBig(t *testing.T) {
	t.Parallel()
	const (
		size    = 64 << 20
		gateAt  = 24 << 20 // the upstream stops here until released
		seed    = 64
		clients = 50
		late    = 5 // whole-blob clients started mid-fill
	)
	gate := newBigGate(gateAt)
	up := pxUpstream(t, false, registry.WithFilesystem(t.TempDir()), registry.WithHandlerWrapper(gate.wrap))
	f := newCachedPX(t, CachedOptions{}, withAliases(map[string]string{"up": up.Host()}))
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	d, err := up.SeedBlob(f.ctx, "team/app", size, registry.RandSeed(seed))
	if err != nil {
		t.Fatal(err)
	}
	tok := f.token("acme", ScopePull)
	url := f.hs.URL + "/v2/up/team/app/blobs/" + d.String()

	// Ranges below the gate (already spooled when asked), across it, past
	// it, to the end, and as a suffix. Their bytes are cut from one pass
	// over the generated blob: nothing holds the whole of it.
	ranges := []*bigRange{
		{first: 0, last: 0},
		{first: 1 << 20, last: 2<<20 - 1},
		{first: gateAt - (3 << 20), last: gateAt - (1 << 20) - 1},
		{first: gateAt - (1 << 20), last: gateAt + (1 << 20) - 1},
		{first: 40 << 20, last: 41<<20 + 12345},
		{first: size - (1 << 20), last: -1},
		{first: -(512 << 10)},
		{first: size - 1, last: size - 1},
	}
	for _, r := range ranges {
		switch {
		case r.first < 0:
			r.header = fmt.Sprintf("bytes=%d", r.first)
			r.first, r.last = size+r.first, size-1
		case r.last < 0:
			r.header = fmt.Sprintf("bytes=%d-", r.first)
			r.last = size - 1
		default:
			r.header = fmt.Sprintf("bytes=%d-%d", r.first, r.last)
		}
	}
	cutRanges(t, seed, size, ranges)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients + late + len(ranges)}}
	defer client.CloseIdleConnections()
	get := func(hdr ...string) (*http.Response, error) {
		req, err := http.NewRequestWithContext(f.ctx, http.MethodGet, url, nil)
		if err != nil {
			return nil, err
		}
		req.SetBasicAuth("ci", tok)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		return client.Do(req)
	}
	whole := func() error {
		resp, err := get()
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.ContentLength != size {
			return fmt.Errorf("whole blob: status %d, Content-Length %d", resp.StatusCode, resp.ContentLength)
		}
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil {
			return fmt.Errorf("whole blob: after %d bytes: %w", n, err)
		}
		if sum := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != size || sum != d.String() {
			return fmt.Errorf("whole blob: %d bytes hashing to %s", n, sum)
		}
		return nil
	}
	ranged := func(r *bigRange) error {
		resp, err := get("Range", r.header)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return fmt.Errorf("%s: after %d bytes: %w", r.header, len(b), err)
		}
		cr := fmt.Sprintf("bytes %d-%d/%d", r.first, r.last, size)
		if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != cr {
			return fmt.Errorf("%s: status %d, Content-Range %q, want 206 %q", r.header, resp.StatusCode, resp.Header.Get("Content-Range"), cr)
		}
		if string(b) != string(r.want) {
			return fmt.Errorf("%s: wrong bytes (%d, want %d)", r.header, len(b), len(r.want))
		}
		return nil
	}

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, clients+late+len(ranges))
	begin := make(chan struct{})
	for range clients {
		wg.Go(func() {
			<-begin
			errs <- whole()
		})
	}
	close(begin)

	select {
	case <-gate.held:
	case <-time.After(60 * time.Second):
		t.Fatal("the upstream never reached the gate")
	}
	held := time.Now()
	if n := up.BlobFetches(d.String()); n > 1 {
		t.Fatalf("the upstream is serving the blob %d times", n)
	}

	// Mid-fill: the upstream is stalled at gateAt.
	early := make(chan error, len(ranges)) // ranges wholly below the gate
	for _, r := range ranges {
		wg.Go(func() {
			err := ranged(r)
			if r.last < gateAt-1 {
				early <- err
			} else {
				errs <- err
			}
		})
	}
	for range late {
		wg.Go(func() { errs <- whole() })
	}
	below := 0
	for _, r := range ranges {
		if r.last < gateAt-1 {
			below++
		}
	}
	for range below {
		select {
		case err := <-early:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a range below the fill point got no answer while the fill was in flight")
		}
	}
	if n := up.BlobFetches(d.String()); n > 1 {
		t.Fatalf("late clients made the upstream serve the blob again (%d)", n)
	}
	close(gate.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("%d whole pulls of %d MiB, %d of them and %d ranges mid-fill: %s (gate held at %s)",
		clients+late, size>>20, late, len(ranges), time.Since(start).Round(time.Millisecond), held.Sub(start).Round(time.Millisecond))
	if n := up.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream served the blob %d times, want 1", n)
	}
	var upBytes int64
	for _, q := range up.Requests() {
		if q.Method == http.MethodGet && q.Path == "/v2/team/app/blobs/"+d.String() {
			upBytes += q.Bytes
		}
	}
	if upBytes != size {
		t.Fatalf("the upstream sent %d blob bytes in all, want %d", upBytes, size)
	}

	// Warm: a whole pull and a range from the committed entry; still one
	// upstream fetch.
	waitCommitted(t, f, d, size)
	if err := whole(); err != nil {
		t.Fatalf("warm: %v", err)
	}
	if err := ranged(ranges[4]); err != nil {
		t.Fatalf("warm: %v", err)
	}
	if n := up.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream served the blob %d times after warm reads, want 1", n)
	}
}

// cutRanges fills each range's want from one pass over the generated blob.
func cutRanges(t *testing.T, seed uint64, size int64, ranges []*bigRange) {
	t.Helper()
	rc, err := registry.RandomBlob(seed, size).Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, err := rc.Read(buf)
		for _, r := range ranges {
			lo, hi := max(r.first, off), min(r.last+1, off+int64(n))
			if lo < hi {
				r.want = append(r.want, buf[lo-off:hi-off]...)
			}
		}
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if off != size {
		t.Fatalf("generated %d bytes, want %d", off, size)
	}
	for _, r := range ranges {
		if int64(len(r.want)) != r.last-r.first+1 {
			t.Fatalf("range %d-%d: cut %d bytes", r.first, r.last, len(r.want))
		}
	}
}

// waitCommitted waits until the verified fill of d is a cache entry of
// size bytes: the commit follows the last byte sent to the clients.
func waitCommitted(t *testing.T, f *cachedPX, d v1.Hash, size int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		desc, err := f.cache.Stat(f.ctx, cache.KindBlob, toDigest(d))
		if err == nil {
			if desc.Size != size {
				t.Fatalf("cache entry of %d bytes, want %d", desc.Size, size)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("blob not committed 10s after a complete fill: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
