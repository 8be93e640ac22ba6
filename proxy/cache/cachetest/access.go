package cachetest

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy/cache"
)

// OpenAccess returns n handles on one new, empty set of access records,
// as n replicas each open it. Implementations that keep records in one
// process return that one value n times. Handles are closed at the test's
// cleanup. Valid must use the real clock.
type OpenAccess func(t *testing.T, n int) []cache.AccessRecords

// TestAccessRecords runs the contract of cache.AccessRecords against open.
func TestAccessRecords(t *testing.T, open OpenAccess) {
	t.Run("RecordValid", func(t *testing.T) { t.Parallel(); testRecordValid(t, open) })
	t.Run("OnlyForward", func(t *testing.T) { t.Parallel(); testOnlyForward(t, open) })
	t.Run("Revoke", func(t *testing.T) { t.Parallel(); testAccessRevoke(t, open) })
	t.Run("Invalid", func(t *testing.T) { t.Parallel(); testAccessInvalid(t, open) })
	t.Run("Concurrent", func(t *testing.T) { t.Parallel(); testAccessConcurrent(t, open) })
}

// now is to the second: stores may keep time to the microsecond.
func now() time.Time { return time.Now().UTC().Truncate(time.Second) }

func valid(t *testing.T, r cache.AccessRecords, k cache.AccessKey, ttl time.Duration) bool {
	t.Helper()
	ok, err := r.Valid(context.Background(), k, ttl)
	if err != nil {
		t.Fatalf("Valid(%+v): %v", k, err)
	}
	return ok
}

func last(t *testing.T, r cache.AccessRecords, k cache.AccessKey) (time.Time, bool) {
	t.Helper()
	at, ok, err := r.Last(context.Background(), k)
	if err != nil {
		t.Fatalf("Last(%+v): %v", k, err)
	}
	return at, ok
}

func testRecordValid(t *testing.T, open OpenAccess) {
	ctx := context.Background()
	h := open(t, 2)
	k := cache.AccessKey{Project: "acme", Upstream: "Reg.Example:5000", Repo: "team/app"}
	if valid(t, h[0], k, time.Hour) {
		t.Fatal("valid before any record")
	}
	if _, ok := last(t, h[0], k); ok {
		t.Fatal("Last before any record")
	}
	at := now().Add(-2 * time.Minute)
	if err := h[0].Record(ctx, k, at); err != nil {
		t.Fatal(err)
	}
	// Seen through the other handle; the upstream compared without case.
	lower := k
	lower.Upstream = "reg.example:5000"
	for _, tc := range []struct {
		ttl  time.Duration
		want bool
	}{{time.Hour, true}, {3 * time.Minute, true}, {time.Minute, false}, {0, false}} {
		if got := valid(t, h[1], lower, tc.ttl); got != tc.want {
			t.Errorf("Valid(ttl %s) = %v, want %v", tc.ttl, got, tc.want)
		}
	}
	if got, ok := last(t, h[1], k); !ok || !got.Equal(at) {
		t.Fatalf("Last = %s, %v; want %s", got, ok, at)
	}
	// Another project, repository or upstream proves nothing.
	for _, other := range []cache.AccessKey{
		{Project: "beta", Upstream: k.Upstream, Repo: k.Repo},
		{Project: k.Project, Upstream: k.Upstream, Repo: "team/other"},
		{Project: k.Project, Upstream: "reg.example", Repo: k.Repo},
	} {
		if valid(t, h[1], other, time.Hour) {
			t.Errorf("%+v valid from %+v's record", other, k)
		}
	}
}

func testOnlyForward(t *testing.T, open OpenAccess) {
	ctx := context.Background()
	h := open(t, 2)
	k := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "app"}
	t2 := now().Add(-time.Minute)
	if err := h[0].Record(ctx, k, t2); err != nil {
		t.Fatal(err)
	}
	if err := h[1].Record(ctx, k, t2.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got, _ := last(t, h[0], k); !got.Equal(t2) {
		t.Fatalf("an older record moved Last back to %s", got)
	}
	t3 := t2.Add(30 * time.Second)
	if err := h[1].Record(ctx, k, t3); err != nil {
		t.Fatal(err)
	}
	if got, _ := last(t, h[0], k); !got.Equal(t3) {
		t.Fatalf("Last = %s, want %s", got, t3)
	}
}

func testAccessRevoke(t *testing.T, open OpenAccess) {
	ctx := context.Background()
	h := open(t, 2)
	k := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "app"}
	keep := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "other"}
	for _, key := range []cache.AccessKey{k, keep} {
		if err := h[0].Record(ctx, key, now()); err != nil {
			t.Fatal(err)
		}
	}
	// The upstream refused the credential: revoked through one replica,
	// gone for all at once.
	up := k
	up.Upstream = "REG.example"
	if err := h[1].Revoke(ctx, up); err != nil {
		t.Fatal(err)
	}
	if valid(t, h[0], k, time.Hour) {
		t.Fatal("valid after Revoke")
	}
	if _, ok := last(t, h[0], k); ok {
		t.Fatal("Last after Revoke")
	}
	if !valid(t, h[0], keep, time.Hour) {
		t.Fatal("Revoke of one repository revoked another")
	}
	if err := h[0].Revoke(ctx, cache.AccessKey{Project: "none", Upstream: "reg.example", Repo: "x"}); err != nil {
		t.Fatalf("Revoke of no record: %v", err)
	}
}

func testAccessInvalid(t *testing.T, open OpenAccess) {
	h := open(t, 1)
	for _, k := range []cache.AccessKey{
		{Upstream: "reg.example", Repo: "app"},
		{Project: "acme", Repo: "app"},
		{Project: "acme", Upstream: "reg.example"},
	} {
		if err := h[0].Record(context.Background(), k, now()); !errors.Is(err, cache.ErrInvalidName) {
			t.Errorf("Record(%+v) = %v, want ErrInvalidName", k, err)
		}
	}
}

func testAccessConcurrent(t *testing.T, open OpenAccess) {
	ctx := context.Background()
	h := open(t, 3)
	k := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "app"}
	base := now().Add(-time.Hour)
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h[i%len(h)].Record(ctx, k, base.Add(time.Duration(i)*time.Second)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got, _ := last(t, h[0], k); !got.Equal(base.Add(29 * time.Second)) {
		t.Fatalf("Last = %s after concurrent records, want the latest", got)
	}
}
