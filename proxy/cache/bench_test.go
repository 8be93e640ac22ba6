package cache

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/registry"
)

const benchSize = 256 << 20

// discardLarge copies into io.Discard with a 1 MiB buffer (io.Discard's
// own ReadFrom uses 8 KiB reads).
func discardLarge(r io.Reader) (int64, error) { return copyLarge(io.Discard, r) }

// BenchmarkWarmRead reads a cached 256 MiB blob: straight from
// distribution's filesystem driver (the baseline), and through the cache.
func BenchmarkWarmRead(b *testing.B) {
	c, _ := newTestCache(b)
	ctx := context.Background()
	layer := registry.RandomBlob(90, benchSize)
	h, _ := layer.Digest()
	d := digest.Digest(h.String())
	fetch := func(context.Context) (Fetched, error) {
		rc, _ := layer.Compressed()
		return Fetched{Body: rc, Size: benchSize}, nil
	}
	r, err := c.Blob(ctx, d, fetch)
	if err != nil {
		b.Fatal(err)
	}
	_, _ = discardLarge(r)
	_ = r.Close()
	waitCommitted(b, c, KindBlob, d)
	path := dataPath(key{KindBlob, d})

	readers := []struct {
		name string
		read func() (int64, error)
	}{
		{"driver", func() (int64, error) { // the baseline
			rc, err := c.drv.Reader(ctx, path, 0)
			if err != nil {
				return 0, err
			}
			defer rc.Close()
			return discardLarge(rc)
		}},
		{"cache", func() (int64, error) {
			r, err := c.Blob(ctx, d, nil)
			if err != nil {
				return 0, err
			}
			defer r.Close()
			return r.WriteTo(io.Discard)
		}},
		{"cache-Read", func() (int64, error) {
			r, err := c.Blob(ctx, d, nil)
			if err != nil {
				return 0, err
			}
			defer r.Close()
			return discardLarge(struct{ io.Reader }{r})
		}},
	}
	paired(b, len(readers), func(i int) {
		if n, err := readers[i].read(); err != nil || n != benchSize {
			b.Fatalf("%s: %d %v", readers[i].name, n, err)
		}
	}, func(i int) string { return readers[i].name })
}

// paired runs variant 0 (the baseline) and the others in turn in every
// iteration, so that a shared, noisy machine slows them alike, and reports
// each variant's throughput and its ratio to the baseline (higher is
// better).
func paired(b *testing.B, n int, run func(i int), name func(i int) string) {
	b.Helper()
	tot := make([]time.Duration, n)
	iters := 0
	for b.Loop() {
		iters++
		for i := range n {
			t0 := time.Now()
			run(i)
			tot[i] += time.Since(t0)
		}
	}
	for i := range n {
		mbps := float64(benchSize) * float64(iters) / tot[i].Seconds() / 1e6
		b.ReportMetric(mbps, name(i)+"-MB/s")
		if i > 0 {
			b.ReportMetric(float64(tot[0])/float64(tot[i]), name(i)+"/"+name(0))
		}
	}
	b.ReportMetric(0, "ns/op")
}

func httpGet(b *testing.B, client *http.Client, url string) int64 {
	resp, err := client.Get(url)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := discardLarge(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("%s: %d bytes, %v", resp.Status, n, err)
	}
	return n
}

// BenchmarkWarmHTTP serves a cached 256 MiB blob over loopback HTTP: by
// distribution itself (the in-process registry on the filesystem driver)
// and by a handler reading it from the cache.
func BenchmarkWarmHTTP(b *testing.B) {
	reg := startUpstream(b)
	d := seedBlob(b, reg, "bench/warm", benchSize, 91)
	c, _ := newTestCache(b)
	srv := httptest.NewServer(blobHandler(c, d, registryFetch(reg, "bench/warm", d, nil, nil)))
	b.Cleanup(srv.Close)
	client := &http.Client{Transport: &http.Transport{}}
	httpGet(b, client, srv.URL) // fill
	waitCommitted(b, c, KindBlob, d)
	variants := []struct{ name, url string }{
		{"distribution", reg.URL() + "/v2/bench/warm/blobs/" + d.String()},
		{"cache", srv.URL},
	}
	paired(b, len(variants), func(i int) {
		if n := httpGet(b, client, variants[i].url); n != benchSize {
			b.Fatal(n)
		}
	}, func(i int) string { return variants[i].name })
}

// BenchmarkCold fetches a 256 MiB blob from the upstream: directly, and
// through a cold cache by one client and by 20 concurrent clients (which
// must make the upstream send it once: reported as upstream-x).
func BenchmarkCold(b *testing.B) {
	reg := startUpstream(b)
	d := seedBlob(b, reg, "bench/cold", benchSize, 92)
	c, _ := newTestCache(b)
	url := reg.URL() + "/v2/bench/cold/blobs/" + d.String()
	fetch := registryFetch(reg, "bench/cold", d, nil, nil)
	client := &http.Client{Transport: &http.Transport{}}
	evict := func() {
		waitFor(b, "commit", func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return len(c.fills) == 0
		})
		if err := c.deleteEntry(context.Background(), key{KindBlob, d}); err != nil {
			b.Fatal(err)
		}
	}
	through := func(clients int) {
		var wg sync.WaitGroup
		for range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := c.Blob(context.Background(), d, fetch)
				if err != nil {
					b.Error(err)
					return
				}
				defer r.Close()
				if n, err := r.WriteTo(io.Discard); err != nil || n != benchSize {
					b.Errorf("%d %v", n, err)
				}
			}()
		}
		wg.Wait()
	}
	// direct: the client discards what it reads; direct-verified: it
	// hashes it, as every real client does (crane, containerd, ...).
	names := []string{"direct", "direct-verified", "cache", "cache-20-clients"}
	before := reg.BlobFetches(d.String())
	iters := 0
	tot := make([]time.Duration, len(names))
	for b.Loop() {
		iters++
		for i := range names {
			if i > 1 {
				b.StopTimer()
				evict()
				b.StartTimer()
			}
			t0 := time.Now()
			switch i {
			case 0:
				httpGet(b, client, url)
			case 1:
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				got, _, err := readAllDigest(resp.Body)
				_ = resp.Body.Close()
				if err != nil || got != d {
					b.Fatalf("%v %s", err, got)
				}
			case 2:
				through(1)
			case 3:
				through(20)
			}
			tot[i] += time.Since(t0)
		}
	}
	for i, n := range names {
		b.ReportMetric(float64(benchSize)*float64(iters)/tot[i].Seconds()/1e6, n+"-MB/s")
		if i > 1 {
			b.ReportMetric(float64(tot[i])/float64(tot[0]), n+"-time/direct")
			b.ReportMetric(float64(tot[i])/float64(tot[1]), n+"-time/direct-verified")
		}
	}
	// Direct GETs count twice per iteration; each cache round must add one.
	b.ReportMetric(float64(reg.BlobFetches(d.String())-before-2*iters)/float64(2*iters), "upstream-fetches/fill")
	b.ReportMetric(0, "ns/op")
}
