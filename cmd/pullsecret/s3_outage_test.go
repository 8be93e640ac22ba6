package main

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/registry"
)

// The object store goes away under a running `pullsecret serve`: /readyz
// turns not-ready (a load balancer moves clients away), a pull gets the
// verified blob from the upstream or a clear 503 — never a clean end of
// wrong bytes — and when the store is back the server serves from it
// again without a restart.
func TestServeS3Outage(t *testing.T) {
	t.Parallel()
	c := newS3Cluster(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := c.up.SeedBlob(ctx, "team/app", 1<<20, registry.RandSeed(11))
	if err != nil {
		t.Fatal(err)
	}
	s := c.serve("")
	if r := c.getBlob(ctx, s, d, nil); r.err != nil || r.status != http.StatusOK || r.hex != d.Hex {
		t.Fatalf("warm pull: %+v", r)
	}
	c.waitObject("blobs", d)

	readyz := func() (int, string) {
		resp, err := http.Get(s.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	c.s3.Stop()
	if code, body := readyz(); code != http.StatusServiceUnavailable || !strings.Contains(body, "cache store") {
		t.Errorf("/readyz with the object store down: %d %q", code, body)
	}
	// The cache is unreadable but the upstream is up: the proxy passes the
	// blob through, verified, rather than fail the pull; what it never does
	// is end a body cleanly that is not the blob.
	r := c.getBlob(ctx, s, d, nil)
	switch {
	case r.status == http.StatusOK && r.err == nil:
		if r.hex != d.Hex || r.n != 1<<20 {
			t.Errorf("a pull with the object store down ended cleanly with the wrong bytes: %+v", r)
		}
		if n := c.up.BlobFetches(d.String()); n != 2 {
			t.Errorf("upstream fetches: %d, want 2 (the fill, then the pass-through)", n)
		}
	case r.status == http.StatusServiceUnavailable:
	default:
		t.Errorf("a pull with the object store down: %+v, want the verified blob or a 503", r)
	}
	t.Logf("with the object store down: status %d, %d bytes, err %v", r.status, r.n, r.err)

	c.s3.Restart(t)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if code, _ := readyz(); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz never came back after the object store did")
		}
	}
	if r := c.getBlob(ctx, s, d, nil); r.err != nil || r.status != http.StatusOK || r.hex != d.Hex {
		t.Fatalf("after the outage: %+v", r)
	}
}
