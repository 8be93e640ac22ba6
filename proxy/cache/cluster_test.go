package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// replicas is a cluster of caches on one storage root, in one process:
// peers reach each other by calling Blob directly, and a replica can be
// "killed" (its peer streams break, its leases stop being renewed).
type replicas struct {
	mu     sync.Mutex
	caches map[string]*Cache
	dead   map[string]bool
	conns  map[string][]context.CancelFunc // open peer streams, by replica
	leases *MemoryLeases
}

func newReplicas(t *testing.T, n int, ttl time.Duration) (*replicas, []*Cache) {
	t.Helper()
	rs := &replicas{caches: map[string]*Cache{}, dead: map[string]bool{}, conns: map[string][]context.CancelFunc{}, leases: NewMemoryLeases(nil)}
	root := t.TempDir()
	var out []*Cache
	for i := range n {
		name := fmt.Sprintf("r%d", i)
		c, err := OpenFilesystem(context.Background(), root, WithCluster(Cluster{
			Leases: &replicaLeases{rs: rs, name: name},
			Self:   name,
			Addr:   name,
			TTL:    ttl,
			Peer:   rs.peer,
		}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		rs.caches[name] = c
		out = append(out, c)
	}
	return rs, out
}

func (rs *replicas) kill(name string) {
	rs.mu.Lock()
	rs.dead[name] = true
	conns := rs.conns[name]
	rs.mu.Unlock()
	for _, cancel := range conns { // its connections reset
		cancel()
	}
}

func (rs *replicas) isDead(name string) bool {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.dead[name]
}

func (rs *replicas) peer(ctx context.Context, addr string, d digest.Digest, off int64) (Fetched, error) {
	if rs.isDead(addr) {
		return Fetched{}, errors.New("connect: connection refused")
	}
	// Like an HTTP body, the stream may be closed while a Read waits.
	sctx, cancel := context.WithCancel(ctx)
	rs.mu.Lock()
	rs.conns[addr] = append(rs.conns[addr], cancel)
	rs.mu.Unlock()
	r, err := rs.caches[addr].Blob(sctx, d, nil)
	if err != nil {
		cancel()
		return Fetched{}, err
	}
	if _, err := r.Seek(off, io.SeekStart); err != nil {
		cancel()
		_ = r.Close()
		return Fetched{}, err
	}
	return Fetched{Body: &peerStream{rs: rs, addr: addr, r: r, cancel: cancel}, Size: r.Size()}, nil
}

// peerStream breaks as a TCP stream does when its replica dies.
type peerStream struct {
	rs     *replicas
	addr   string
	cancel context.CancelFunc
	mu     sync.Mutex // held by Read: Close waits for it after canceling
	r      *Reader
}

func (p *peerStream) Read(b []byte) (int, error) {
	if p.rs.isDead(p.addr) {
		return 0, errors.New("read: connection reset by peer")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.r.Read(b)
}

func (p *peerStream) Close() error {
	p.cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.r.Close()
}

// replicaLeases is the shared table as one replica sees it: a dead
// replica renews and releases nothing.
type replicaLeases struct {
	rs   *replicas
	name string
}

func (l *replicaLeases) Acquire(ctx context.Context, key, holder, addr string, ttl time.Duration) (Lease, bool, error) {
	return l.rs.leases.Acquire(ctx, key, holder, addr, ttl)
}

func (l *replicaLeases) Renew(ctx context.Context, key, holder string, ttl time.Duration) error {
	if l.rs.isDead(l.name) {
		return errors.New("dead")
	}
	return l.rs.leases.Renew(ctx, key, holder, ttl)
}

func (l *replicaLeases) Release(ctx context.Context, key, holder string) error {
	if l.rs.isDead(l.name) {
		return nil
	}
	return l.rs.leases.Release(ctx, key, holder)
}

// Concurrent cold requests spread over three replicas: one upstream fetch,
// every reader gets verified bytes.
func TestClusterOneUpstreamFetch(t *testing.T) {
	t.Parallel()
	_, cs := newReplicas(t, 3, 2*time.Second)
	content := randomBytes(8<<20, 7)
	d := digest.FromBytes(content)
	var calls fetchCounter
	gh := newGateHolder(1 << 20)
	fetch := bytesFetch(content, &calls, gh.wrap)

	const perReplica = 5
	var wg sync.WaitGroup
	errs := make(chan error, perReplica*len(cs)+1)
	start := func(c *Cache) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.Blob(context.Background(), d, fetch)
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			got, n, err := readAllDigest(r)
			if err == nil && (got != d || n != int64(len(content))) {
				err = fmt.Errorf("read %d bytes of %s, want %s", n, got, d)
			}
			errs <- err
		}()
	}
	// The first replica starts the fill; the rest join while it is stuck
	// at 1 MiB, so all of them overlap it.
	start(cs[0])
	g := gh.gate(t)
	for _, c := range cs {
		for range perReplica {
			start(c)
		}
	}
	waitFor(t, "every replica to have a fill in flight", func() bool {
		for _, c := range cs {
			c.mu.Lock()
			n := len(c.fills)
			c.mu.Unlock()
			if n == 0 {
				return false
			}
		}
		return true
	})
	g.Open(-1)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := calls.n.Load(); n != 1 {
		t.Errorf("upstream fetched %d times, want 1", n)
	}
	for _, c := range cs {
		waitCommitted(t, c, KindBlob, d)
	}
}

// The filler dies mid-fill: a reader on another replica, streaming from
// it, pauses until the lease lapses, then gets the rest from the upstream
// itself and ends with the whole verified blob.
func TestClusterFillerDies(t *testing.T) {
	t.Parallel()
	rs, cs := newReplicas(t, 2, 300*time.Millisecond)
	a, b := cs[0], cs[1]
	content := randomBytes(4<<20, 9)
	d := digest.FromBytes(content)

	// a's upstream stalls at 2 MiB for good: a "hangs", then is killed.
	var aCalls, bCalls fetchCounter
	gh := newGateHolder(2 << 20)
	t.Cleanup(func() {
		if g := gh.g; g != nil {
			_ = g.Close()
		}
	})
	ra, err := a.Blob(context.Background(), d, bytesFetch(content, &aCalls, gh.wrap))
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	gh.gate(t)

	var read atomic.Int64
	done := make(chan error, 1)
	go func() {
		r, err := b.Blob(context.Background(), d, bytesFetch(content, &bCalls, nil))
		if err != nil {
			done <- err
			return
		}
		defer r.Close()
		got, n, err := readAllDigest(io.TeeReader(r, countWriter{&read}))
		if err == nil && (got != d || n != int64(len(content))) {
			err = fmt.Errorf("read %d bytes of %s, want %s", n, got, d)
		}
		done <- err
	}()
	waitFor(t, "b to stream a's first 2 MiB", func() bool { return read.Load() >= 2<<20-1 })
	if bCalls.n.Load() != 0 {
		t.Fatal("b fetched from the upstream while a was alive")
	}
	rs.kill("r0")
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("reader on b: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader on b never finished")
	}
	if aCalls.n.Load() != 1 || bCalls.n.Load() != 1 {
		t.Errorf("upstream fetches: a %d, b %d; want 1 each (b takes over once)", aCalls.n.Load(), bCalls.n.Load())
	}
	waitCommitted(t, b, KindBlob, d)
}

// A replica asked for a blob it has neither in flight nor committed says
// so, instead of fetching it.
func TestClusterPeerNeverFetches(t *testing.T) {
	t.Parallel()
	rs, _ := newReplicas(t, 1, time.Second)
	_, err := rs.peer(context.Background(), "r0", digest.FromString("nothing"), 0)
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("peer of an unknown blob: %v, want ErrNotFound", err)
	}
}

type countWriter struct{ n *atomic.Int64 }

func (w countWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}
