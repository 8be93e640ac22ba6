package main

// Issue 7, operations: a replica that Kubernetes stops (SIGTERM) drains.
// It turns /readyz not-ready at once, goes on serving new connections for
// shutdown_delay while the endpoints catch up, then stops accepting, and
// only exits once the streams in flight have finished, verified, with the
// fill committed to the cache.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/testbin"
)

func TestServeDrainsOnSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs pullsecret serve")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e := newEnv(t)
	bin := testbin.Build(t, "pullsecret")

	const size = 8 << 20
	stall := &stallOnce{path: regexp.MustCompile(`/blobs/sha256:`), held: 1 << 20,
		stalled: make(chan struct{}), release: make(chan struct{})}
	up, d, tok := stallingUpstream(ctx, t, e, stall, size, 77)

	// Long enough for the checks below on a loaded machine.
	const delay = 3 * time.Second
	config := fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\nshutdown_delay: %s\nshutdown_timeout: 60s\n", up.Host(), delay)
	srv := testbin.Serve(t, bin, []string{"PULLSECRET_HOME=" + e.home}, config)
	t.Cleanup(func() {
		for _, f := range append(canaryForms(), tok) {
			if strings.Contains(srv.Logs(), f) {
				t.Errorf("serve logged a credential (%.12s...)", f)
			}
		}
	})
	blobURL := srv.URL + "/v2/up/team/app/blobs/" + d.String()
	status := func(path string) (int, error) {
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
		resp, err := c.Get(srv.URL + path)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}

	// A cold pull, caught mid-fill by the upstream.
	var got atomic.Int64
	first := make(chan blobGET, 1)
	go func() { first <- getBlob(ctx, blobURL, tok, &got) }()
	select {
	case <-stall.stalled:
	case r := <-first:
		t.Fatalf("the pull ended before the upstream stalled: %+v\n%s", r, srv.Logs())
	}
	for deadline := time.Now().Add(30 * time.Second); got.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no byte reached the client\n%s", srv.Logs())
		}
	}

	srv.Terminate(t)
	term := time.Now()

	// Not ready at once, yet serving: a second client, arriving on a new
	// connection during the delay, joins the stream.
	for {
		code, err := status("/readyz")
		if err == nil && code == http.StatusServiceUnavailable {
			break
		}
		if time.Since(term) > delay/2 {
			t.Fatalf("/readyz still %d (%v) %s after SIGTERM", code, err, time.Since(term))
		}
		time.Sleep(20 * time.Millisecond)
	}
	second := make(chan blobGET, 1)
	go func() { second <- getBlob(ctx, blobURL, tok, nil) }()
	if code, err := status("/healthz"); err != nil || code != http.StatusOK {
		t.Fatalf("a new connection during shutdown_delay: %d %v", code, err)
	}
	if since := time.Since(term); since >= delay {
		t.Fatalf("the checks took %s, longer than the delay: the test proves nothing", since)
	}

	// After the delay the listener closes while the streams are held.
	for {
		c, err := net.DialTimeout("tcp", srv.Host, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Since(term) > delay+10*time.Second {
			t.Fatal("still accepting connections 10s after shutdown_delay")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if since := time.Since(term); since < delay {
		t.Fatalf("connections refused %s after SIGTERM, before shutdown_delay %s", since, delay)
	}
	select {
	case r := <-first:
		t.Fatalf("the first pull ended while the upstream was held: %+v", r)
	default:
	}

	// The upstream goes on: both streams finish, verified, and the server
	// exits cleanly with the blob committed.
	close(stall.release)
	for i, ch := range []chan blobGET{first, second} {
		r := <-ch
		if r.err != nil || r.status != http.StatusOK || r.n != size || r.sum != d.String() {
			t.Errorf("pull %d across the shutdown: status %d, %d of %d bytes, %s, %v", i+1, r.status, r.n, size, r.sum, r.err)
		}
	}
	if err := srv.Wait(t, 30*time.Second); err != nil {
		t.Fatalf("serve exited with %v after a graceful shutdown:\n%s", err, srv.Logs())
	}
	final := filepath.Join(e.home, "cache", "blobs", "sha256", d.Hex[:2], d.Hex, "data")
	if got := sha256File(t, final); got != d.String() {
		t.Fatalf("cache entry after the drain: %s", got)
	}
	if n := up.BlobFetches(d.String()); n != 1 {
		t.Errorf("upstream fetches of the blob: %d, want 1", n)
	}
	if !strings.Contains(srv.Logs(), "still serving while load balancers catch up") {
		t.Errorf("no shutdown_delay in the log:\n%s", srv.Logs())
	}
}
