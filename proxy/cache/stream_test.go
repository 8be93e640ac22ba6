package cache

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// blobHandler serves one blob through the cache the way the proxy does:
// Content-Length from the Reader, then io.Copy (Reader.WriteTo: sendfile
// from a committed file, the spool otherwise).
func blobHandler(c *Cache, d digest.Digest, fetch FetchFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r, err := c.Blob(req.Context(), d, fetch)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer r.Close()
		if n := r.Size(); n >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		if _, err := io.Copy(w, r); err != nil {
			// Abort: the client must see a broken response, not a short one.
			panic(http.ErrAbortHandler)
		}
	})
}

func TestServeOverHTTP(t *testing.T) {
	t.Parallel()
	const size = 16 << 20
	reg := startUpstream(t)
	d := seedBlob(t, reg, "lib/http", size, 70)
	c, _ := newTestCache(t)
	srv := httptest.NewServer(blobHandler(c, d, registryFetch(reg, "lib/http", d, nil, nil)))
	defer srv.Close()
	for _, pass := range []string{"cold", "warm"} {
		resp, err := http.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		got, n, err := readAllDigest(resp.Body)
		_ = resp.Body.Close()
		if err != nil || n != size || got != d || resp.ContentLength != size {
			t.Fatalf("%s: %d bytes, %s, %v", pass, n, got, err)
		}
		waitCommitted(t, c, KindBlob, d)
	}
	if n := reg.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream fetches %d", n)
	}
}

// Memory stays flat while 20 readers stream a 256 MiB blob from a cold
// fill: the spool is on disk, buffers are pooled.
func TestHeapGrowthManyReaders(t *testing.T) {
	if testing.Short() {
		t.Skip("streams 20 x 256 MiB; skipped with -short")
	}
	// Not parallel: it measures the process heap.
	const size = 256 << 20
	const readers = 20
	reg := startUpstream(t)
	d := seedBlob(t, reg, "lib/big", size, 80)
	c, _ := newTestCache(t)
	fetch := registryFetch(reg, "lib/big", d, nil, nil)

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			if m.HeapAlloc > peak.Load() {
				peak.Store(m.HeapAlloc)
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	var wg sync.WaitGroup
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.Blob(context.Background(), d, fetch)
			if err != nil {
				t.Error(err)
				return
			}
			defer r.Close()
			if i%5 != 0 {
				// Correctness of every reader's bytes is TestCoalescedColdBlob's
				// job; here hashing 5 GiB would only cost CPU time.
				n, err := r.WriteTo(io.Discard)
				if err != nil || n != size {
					t.Errorf("reader: %d bytes, %v", n, err)
				}
				return
			}
			got, n, err := readAllDigest(r)
			if err != nil || n != size || got != d {
				t.Errorf("reader: %d bytes %s %v", n, got, err)
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	growth := int64(peak.Load()) - int64(base)
	t.Logf("heap: base %d MiB, peak %d MiB, growth %d MiB, upstream fetches %d",
		base>>20, peak.Load()>>20, growth>>20, reg.BlobFetches(d.String()))
	if growth >= 64<<20 {
		t.Fatalf("heap grew by %d MiB while streaming, want < 64 MiB", growth>>20)
	}
	if n := reg.BlobFetches(d.String()); n != 1 {
		t.Fatalf("upstream fetches %d, want 1", n)
	}
}
