package cache

import (
	"context"
	"errors"
	"sync"
	"time"
)

// ErrLeaseLost is Renew's error when another holder has the lease.
var ErrLeaseLost = errors.New("fill lease held by another replica")

// Lease says which replica fills a digest, where the others reach it, and
// until when, unless renewed.
type Lease struct {
	Key     string
	Holder  string
	Addr    string
	Expires time.Time
}

// Leases is the table of fill leases shared by the replicas of a cluster
// (see Cluster). A PostgreSQL table implements it for real clusters;
// MemoryLeases serves one process and tests.
type Leases interface {
	// Acquire returns the current lease of key, and true if holder now
	// holds it: it was free or expired (taken over), or already holder's.
	Acquire(ctx context.Context, key, holder, addr string, ttl time.Duration) (Lease, bool, error)
	// Renew extends holder's lease by ttl, or fails with ErrLeaseLost.
	Renew(ctx context.Context, key, holder string, ttl time.Duration) error
	// Release ends holder's lease (nothing if it is not holder's).
	Release(ctx context.Context, key, holder string) error
}

// MemoryLeases is a Leases in memory. It is safe for concurrent use.
type MemoryLeases struct {
	now func() time.Time
	mu  sync.Mutex
	m   map[string]Lease
}

// NewMemoryLeases returns an empty lease table on the clock now (nil:
// time.Now).
func NewMemoryLeases(now func() time.Time) *MemoryLeases {
	if now == nil {
		now = time.Now
	}
	return &MemoryLeases{now: now, m: map[string]Lease{}}
}

// Acquire implements Leases.
func (l *MemoryLeases) Acquire(_ context.Context, key, holder, addr string, ttl time.Duration) (Lease, bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	cur, ok := l.m[key]
	if ok && cur.Holder != holder && now.Before(cur.Expires) {
		return cur, false, nil
	}
	cur = Lease{Key: key, Holder: holder, Addr: addr, Expires: now.Add(ttl)}
	l.m[key] = cur
	return cur, true, nil
}

// Renew implements Leases.
func (l *MemoryLeases) Renew(_ context.Context, key, holder string, ttl time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	cur, ok := l.m[key]
	if !ok || cur.Holder != holder {
		return ErrLeaseLost
	}
	cur.Expires = now.Add(ttl)
	l.m[key] = cur
	return nil
}

// Release implements Leases.
func (l *MemoryLeases) Release(_ context.Context, key, holder string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.m[key]; ok && cur.Holder == holder {
		delete(l.m, key)
	}
	return nil
}
