// Package cachetest holds the contracts of the cache's shared-state
// interfaces (Leases, AccessRecords) as test suites, which every
// implementation (in memory, on file, PostgreSQL) runs.
//
// The package is for tests only.
package cachetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy/cache"
)

// OpenLeases returns n handles on one new, empty lease table, as n
// replicas each open it. Handles are closed at the test's cleanup.
type OpenLeases func(t *testing.T, n int) []cache.Leases

// leaseTTL is short so that expiry tests are quick, and long enough that
// a loaded machine does not expire a lease between two calls that expect
// it held.
const leaseTTL = 2 * time.Second

// TestLeases runs the contract of cache.Leases against open. Expiry is
// real time: the suite sleeps a few seconds in all, in parallel.
func TestLeases(t *testing.T, open OpenLeases) {
	t.Run("AcquireHeld", func(t *testing.T) { t.Parallel(); testAcquireHeld(t, open) })
	t.Run("RenewRelease", func(t *testing.T) { t.Parallel(); testRenewRelease(t, open) })
	t.Run("Takeover", func(t *testing.T) { t.Parallel(); testTakeover(t, open) })
	t.Run("ConcurrentAcquire", func(t *testing.T) { t.Parallel(); testConcurrentAcquire(t, open) })
	t.Run("ConcurrentTakeover", func(t *testing.T) { t.Parallel(); testConcurrentTakeover(t, open) })
}

func acquire(t *testing.T, l cache.Leases, key, holder, addr string, ttl time.Duration) (cache.Lease, bool) {
	t.Helper()
	lease, ok, err := l.Acquire(context.Background(), key, holder, addr, ttl)
	if err != nil {
		t.Fatalf("Acquire(%s, %s): %v", key, holder, err)
	}
	return lease, ok
}

// checkExpires: a lease granted between before and after for ttl expires
// ttl after the grant, on a clock (the database's, say) within a second of
// this one.
func checkExpires(t *testing.T, l cache.Lease, before, after time.Time, ttl time.Duration) {
	t.Helper()
	const skew = time.Second
	if l.Expires.Before(before.Add(ttl-skew)) || l.Expires.After(after.Add(ttl+skew)) {
		t.Fatalf("lease %s expires %s, want about %s after %s", l.Key, l.Expires, ttl, before)
	}
}

func testAcquireHeld(t *testing.T, open OpenLeases) {
	h := open(t, 2)
	before := time.Now()
	l, ok := acquire(t, h[0], "blob/sha256:a", "r1", "10.0.0.1:5080", leaseTTL)
	if !ok || l.Key != "blob/sha256:a" || l.Holder != "r1" || l.Addr != "10.0.0.1:5080" {
		t.Fatalf("Acquire of a free lease = %+v, %v", l, ok)
	}
	checkExpires(t, l, before, time.Now(), leaseTTL)
	// Held: another replica is told who holds it and where.
	got, ok := acquire(t, h[1], "blob/sha256:a", "r2", "10.0.0.2:5080", leaseTTL)
	if ok || got.Holder != "r1" || got.Addr != "10.0.0.1:5080" || !got.Expires.Equal(l.Expires) {
		t.Fatalf("Acquire of a held lease = %+v, %v; want r1's, false", got, ok)
	}
	// Its holder acquires it again: still its own, the address updated.
	before = time.Now()
	again, ok := acquire(t, h[1], "blob/sha256:a", "r1", "10.0.0.9:5080", 3*leaseTTL)
	if !ok || again.Holder != "r1" || again.Addr != "10.0.0.9:5080" {
		t.Fatalf("Acquire by the holder = %+v, %v", again, ok)
	}
	checkExpires(t, again, before, time.Now(), 3*leaseTTL)
	// Keys are independent.
	if other, ok := acquire(t, h[1], "blob/sha256:b", "r2", "10.0.0.2:5080", leaseTTL); !ok || other.Holder != "r2" {
		t.Fatalf("Acquire of another key = %+v, %v", other, ok)
	}
}

func testRenewRelease(t *testing.T, open OpenLeases) {
	ctx := context.Background()
	h := open(t, 2)
	if err := h[0].Renew(ctx, "k", "r1", leaseTTL); !errors.Is(err, cache.ErrLeaseLost) {
		t.Fatalf("Renew of no lease = %v, want ErrLeaseLost", err)
	}
	first, _ := acquire(t, h[0], "k", "r1", "a1", leaseTTL)
	time.Sleep(10 * time.Millisecond)
	if err := h[1].Renew(ctx, "k", "r1", 5*leaseTTL); err != nil {
		t.Fatalf("Renew by the holder: %v", err)
	}
	cur, ok := acquire(t, h[1], "k", "r2", "a2", leaseTTL)
	if ok || !cur.Expires.After(first.Expires) {
		t.Fatalf("after Renew: %+v, %v; want r1's lease, extended", cur, ok)
	}
	err := h[1].Renew(ctx, "k", "r2", leaseTTL)
	if !errors.Is(err, cache.ErrLeaseLost) {
		t.Fatalf("Renew by another = %v, want ErrLeaseLost", err)
	}
	// Release by another does nothing.
	if err := h[1].Release(ctx, "k", "r2"); err != nil {
		t.Fatal(err)
	}
	if _, ok := acquire(t, h[1], "k", "r2", "a2", leaseTTL); ok {
		t.Fatal("Release by a non-holder freed the lease")
	}
	// Release by the holder frees it at once, for every replica.
	if err := h[0].Release(ctx, "k", "r1"); err != nil {
		t.Fatal(err)
	}
	if l, ok := acquire(t, h[1], "k", "r2", "a2", leaseTTL); !ok || l.Holder != "r2" {
		t.Fatalf("Acquire after Release = %+v, %v", l, ok)
	}
	if err := h[0].Release(ctx, "never", "r1"); err != nil {
		t.Fatalf("Release of no lease: %v", err)
	}
}

func testTakeover(t *testing.T, open OpenLeases) {
	ctx := context.Background()
	h := open(t, 2)
	const short = 300 * time.Millisecond
	first, ok := acquire(t, h[0], "k", "dead", "a1", short)
	if !ok {
		t.Fatal("Acquire of a free lease failed")
	}
	if _, ok := acquire(t, h[1], "k", "r2", "a2", leaseTTL); ok {
		t.Fatal("a live lease was taken over")
	}
	// Renewing past the expiry still works while nobody took over.
	time.Sleep(time.Until(first.Expires) + 50*time.Millisecond)
	if err := h[0].Renew(ctx, "k", "dead", short); err != nil {
		t.Fatalf("late Renew before any takeover: %v", err)
	}
	// The holder stops renewing (it died): once expired, another takes
	// the lease over.
	time.Sleep(short + 100*time.Millisecond)
	before := time.Now()
	l, ok := acquire(t, h[1], "k", "r2", "a2", leaseTTL)
	if !ok || l.Holder != "r2" || l.Addr != "a2" {
		t.Fatalf("Acquire of an expired lease = %+v, %v; want taken over", l, ok)
	}
	checkExpires(t, l, before, time.Now(), leaseTTL)
	// The old holder, back, has lost it: it can neither renew nor release.
	if err := h[0].Renew(ctx, "k", "dead", leaseTTL); !errors.Is(err, cache.ErrLeaseLost) {
		t.Fatalf("Renew by the old holder = %v, want ErrLeaseLost", err)
	}
	if err := h[0].Release(ctx, "k", "dead"); err != nil {
		t.Fatal(err)
	}
	if cur, ok := acquire(t, h[0], "k", "dead", "a1", leaseTTL); ok || cur.Holder != "r2" {
		t.Fatalf("after the old holder's Release: %+v, %v; want r2 still holding", cur, ok)
	}
}

// race runs one Acquire per holder, all at once across the handles, and
// checks that exactly one wins and that every loser is told the winner.
func race(t *testing.T, h []cache.Leases, key string, holders int) {
	t.Helper()
	type result struct {
		l   cache.Lease
		ok  bool
		err error
	}
	results := make([]result, holders)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range holders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			l, ok, err := h[i%len(h)].Acquire(context.Background(), key, fmt.Sprint("r", i), fmt.Sprint("addr", i), leaseTTL)
			results[i] = result{l, ok, err}
		}()
	}
	close(start)
	wg.Wait()
	winner := ""
	for i, r := range results {
		if r.err != nil {
			t.Fatalf("%s: Acquire by r%d: %v", key, i, r.err)
		}
		if r.ok {
			if winner != "" {
				t.Fatalf("%s: both %s and r%d acquired the lease", key, winner, i)
			}
			winner = fmt.Sprint("r", i)
		}
	}
	if winner == "" {
		t.Fatalf("%s: nobody acquired a free lease", key)
	}
	for i, r := range results {
		if r.l.Holder != winner || r.l.Addr != "addr"+winner[1:] {
			t.Fatalf("%s: r%d was told %+v, want %s's lease", key, i, r.l, winner)
		}
	}
}

func testConcurrentAcquire(t *testing.T, open OpenLeases) {
	h := open(t, 4)
	for k := range 10 {
		race(t, h, fmt.Sprint("blob/sha256:race", k), 8)
	}
}

func testConcurrentTakeover(t *testing.T, open OpenLeases) {
	h := open(t, 4)
	const short = 200 * time.Millisecond
	var last time.Time
	for k := range 5 {
		l, ok := acquire(t, h[0], fmt.Sprint("blob/sha256:dead", k), "dead", "gone", short)
		if !ok {
			t.Fatal("Acquire of a free lease failed")
		}
		last = l.Expires
	}
	time.Sleep(time.Until(last) + 100*time.Millisecond)
	for k := range 5 {
		race(t, h, fmt.Sprint("blob/sha256:dead", k), 8)
	}
}
