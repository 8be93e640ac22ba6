package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// Cluster makes replicas that share one storage driver fetch each blob
// from the upstream once between them, not once each.
//
// A replica that misses a blob (and has no fill of it in flight) asks
// Leases for the digest's fill lease. The winner fetches from the upstream
// as a single replica would, renewing the lease until its fill has
// committed. Every other replica streams the bytes from the winner's
// in-flight fill through Peer, into a local fill of its own, so its local
// waiters still coalesce on one transfer and everything is verified again
// before anyone gets the last byte.
//
// A filler that dies stops renewing its lease: a replica whose peer stream
// breaks (or never starts) waits for the lease to lapse, takes it over, and
// continues its fill from the offset it had reached — from the upstream,
// skipping the bytes it already has, or from whichever replica now holds
// the lease. Its readers see a pause, not an error; the final digest check
// still covers every byte.
type Cluster struct {
	// Leases decides which replica fills a digest.
	Leases Leases
	// Self names this replica in the lease table.
	Self string
	// Addr is where the other replicas reach this replica's Peer endpoint.
	Addr string
	// TTL is how long a lease lasts without renewal (default 15s): the
	// longest a filler's death delays the others.
	TTL time.Duration
	// Peer streams blob d from the replica at addr, starting at byte off,
	// out of that replica's in-flight fill or committed entry. It must
	// fail (ErrNotFound when the replica has neither) rather than start a
	// fetch of its own. Fetched.Size is the size of the whole blob when
	// known, else -1.
	Peer func(ctx context.Context, addr string, d digest.Digest, off int64) (Fetched, error)
}

// DefaultLeaseTTL is Cluster.TTL's default.
const DefaultLeaseTTL = 15 * time.Second

// maxRelayOpens bounds how many times one fill looks for a new source
// after losing one (each look waits up to a lease TTL).
const maxRelayOpens = 8

// WithCluster coordinates fills with the other replicas of cl.
func WithCluster(cl Cluster) Option {
	return func(c *config) {
		if cl.TTL <= 0 {
			cl.TTL = DefaultLeaseTTL
		}
		c.cluster = &cl
	}
}

func leaseKey(k key) string { return string(k.kind) + "/" + k.d.String() }

// clusterFetch wraps a fill's upstream fetch so that the fill's source is
// chosen by the lease: the upstream when this replica holds it, the
// holder's fill otherwise. onDone (run when the fill has ended, committed
// or not) stops the renewal and releases the lease.
func (c *Cache) clusterFetch(f *fill, upstream FetchFunc) (FetchFunc, func()) {
	r := &relay{c: c, cl: c.cfg.cluster, k: f.k, upstream: upstream}
	fetch := func(ctx context.Context) (Fetched, error) {
		r.ctx = ctx
		fd, err := r.open(ctx, 0)
		if err != nil {
			return Fetched{}, err
		}
		r.cur = fd.Body
		return Fetched{Body: r, Size: fd.Size, MediaType: fd.MediaType}, nil
	}
	return fetch, r.done
}

// relay is the body of a cluster fill: the current source's bytes, and on
// the loss of a peer source a new source from the same offset.
type relay struct {
	c        *Cache
	cl       *Cluster
	k        key
	upstream FetchFunc
	ctx      context.Context

	curMu    sync.Mutex // guards cur and closed: Close comes from another goroutine
	cur      io.ReadCloser
	closed   bool
	off      int64
	fromPeer bool
	peerAddr string

	mu       sync.Mutex
	held     bool
	stopRenw context.CancelFunc
	renewed  chan struct{}
}

// open returns a source of the blob from byte off.
func (r *relay) open(ctx context.Context, off int64) (Fetched, error) {
	var lastErr error
	for attempt := range maxRelayOpens {
		l, mine, err := r.cl.Leases.Acquire(ctx, leaseKey(r.k), r.cl.Self, r.cl.Addr, r.cl.TTL)
		if err != nil {
			return Fetched{}, fmt.Errorf("fill lease of %s: %w", r.k.d, err)
		}
		if mine {
			r.hold(ctx)
			fd, err := r.upstream(ctx)
			if err != nil {
				return Fetched{}, err
			}
			if off > 0 {
				// Fetch functions have no offset; the bytes before off
				// were hashed already and are skipped. Content that
				// changed under the same digest fails the final check.
				if _, err := io.CopyN(io.Discard, fd.Body, off); err != nil {
					_ = fd.Body.Close()
					return Fetched{}, fmt.Errorf("resume %s at %d from the upstream: %w", r.k.d, off, err)
				}
			}
			r.fromPeer, r.peerAddr = false, ""
			r.c.log.Debug("cache: cluster fill from the upstream", "digest", r.k.d, "offset", off, "attempt", attempt)
			return fd, nil
		}
		fd, err := r.cl.Peer(ctx, l.Addr, r.k.d, off)
		if err == nil {
			r.fromPeer, r.peerAddr = true, l.Addr
			r.c.m.Coalesced(r.k.kind, Labels{})
			r.c.log.Debug("cache: cluster fill from a peer", "digest", r.k.d, "peer", l.Holder, "offset", off, "attempt", attempt)
			return fd, nil
		}
		lastErr = err
		if errors.Is(err, ErrNotFound) {
			// The holder has no fill of it: perhaps it has just committed.
			if cr, err := r.c.openCommitted(ctx, r.k); err == nil {
				if _, err := cr.Seek(off, io.SeekStart); err != nil {
					_ = cr.Close()
					return Fetched{}, err
				}
				r.fromPeer = false
				return Fetched{Body: cr, Size: cr.Size()}, nil
			}
		}
		r.c.log.Info("cache: fill lease holder unreachable, waiting for its lease",
			"digest", r.k.d, "holder", l.Holder, "expires", l.Expires, "err", err)
		// A live holder renews its lease; a dead one lets it lapse.
		wait := time.Until(l.Expires)
		wait = min(max(wait, r.cl.TTL/10), r.cl.TTL)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return Fetched{}, ctx.Err()
		}
	}
	return Fetched{}, fmt.Errorf("no replica could fill %s: %w", r.k.d, lastErr)
}

func (r *relay) Read(p []byte) (int, error) {
	for {
		r.curMu.Lock()
		cur := r.cur
		r.curMu.Unlock()
		n, err := cur.Read(p)
		r.off += int64(n)
		if err == nil || err == io.EOF || !r.fromPeer || r.ctx.Err() != nil {
			return n, err
		}
		// The peer went away mid-stream: find the next source.
		r.c.log.Info("cache: peer stream broke, resuming", "digest", r.k.d, "peer", r.peerAddr, "offset", r.off, "err", err)
		_ = cur.Close()
		fd, oerr := r.open(r.ctx, r.off)
		if oerr != nil {
			return n, fmt.Errorf("%w (and no other source: %w)", err, oerr)
		}
		r.curMu.Lock()
		if r.closed {
			r.curMu.Unlock()
			_ = fd.Body.Close()
			return n, errors.New("cache: fill body closed")
		}
		r.cur = fd.Body
		r.curMu.Unlock()
		if n > 0 {
			return n, nil
		}
	}
}

func (r *relay) Close() error {
	r.curMu.Lock()
	r.closed = true
	cur := r.cur
	r.curMu.Unlock()
	return cur.Close()
}

// hold starts renewing the lease this replica has just won.
func (r *relay) hold(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.held {
		return
	}
	r.held = true
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.stopRenw = cancel
	r.renewed = make(chan struct{})
	go func() {
		defer close(r.renewed)
		t := time.NewTicker(r.cl.TTL / 3)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-t.C:
				if err := r.cl.Leases.Renew(rctx, leaseKey(r.k), r.cl.Self, r.cl.TTL); err != nil && rctx.Err() == nil {
					// Another replica may start a fill of its own: the
					// upstream sends the blob twice, nothing worse.
					r.c.log.Warn("cache: fill lease renewal failed", "digest", r.k.d, "err", err)
				}
			}
		}
	}()
}

// done stops the renewal and releases the lease, once the fill has
// committed or failed: a replica that looks after that finds the entry.
func (r *relay) done() {
	r.mu.Lock()
	held := r.held
	r.held = false
	r.mu.Unlock()
	if !held {
		return
	}
	r.stopRenw()
	<-r.renewed
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.cl.Leases.Release(ctx, leaseKey(r.k), r.cl.Self); err != nil {
		r.c.log.Warn("cache: release fill lease", "digest", r.k.d, "err", err)
	}
}

// committedElsewhere reports whether another replica has committed f's
// entry already (the usual end of a fill streamed from a peer), and then
// drops f's spool: writing the same verified bytes again would only cost
// the object store a second upload.
func (c *Cache) committedElsewhere(ctx context.Context, f *fill) bool {
	if _, err := c.drv.Stat(ctx, dataPath(f.k)); err != nil {
		return false
	}
	f.mu.Lock()
	if f.spoolPath != "" {
		_ = os.Remove(f.spoolPath) // readers keep their descriptor
		f.spoolPath = ""
	}
	f.mu.Unlock()
	return true
}
