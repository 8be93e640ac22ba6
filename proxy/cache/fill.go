package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// fill is one upstream fetch of one blob into a local spool file, shared by
// every request for that digest while it runs.
//
// The fill goroutine reads the upstream body, appends it to the spool,
// publishes the new length and hashes it. Readers pread the spool, each at
// its own offset, and wait on notify (a channel closed and replaced at each
// publication) when they have caught up: no polling. Until the digest is
// verified, the last byte is held back, so no reader ever sees the whole of
// unverified content: a corrupted or truncated upstream body reaches every
// reader as an error from Read, never as a complete body.
type fill struct {
	c      *Cache
	k      key
	origin *repoRef
	labels Labels

	ctx    context.Context
	cancel context.CancelFunc

	started chan struct{} // closed once the fetch answered (size known) or the fill failed

	mu          sync.Mutex
	notify      chan struct{}
	startedDone bool
	size        int64 // -1 until known
	written     int64
	verified    bool
	err         error
	fetchFailed bool
	file        *os.File
	spoolPath   string
	refs        int // the fill goroutine + open readers (and joiners not yet readers)

	onDone func() // after the fill has committed or failed (cluster lease release)
}

// fillBufSize is the read size from the upstream: big enough for few
// syscalls, small enough that bytes reach the readers at once.
const fillBufSize = 256 << 10

var (
	bufPool      = sync.Pool{New: func() any { b := make([]byte, fillBufSize); return &b }}
	largeBufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
)

func (c *Cache) newFill(callerCtx context.Context, k key, o *request) *fill {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(callerCtx), c.cfg.fillTimeout)
	stop := context.AfterFunc(c.baseCtx, cancel)
	f := &fill{
		c:       c,
		k:       k,
		origin:  o.in,
		labels:  o.labels,
		ctx:     ctx,
		cancel:  func() { stop(); cancel() },
		started: make(chan struct{}),
		notify:  make(chan struct{}),
		size:    -1,
		refs:    2, // the fill goroutine and the request that starts it
	}
	return f
}

// publishLocked wakes every waiting reader.
func (f *fill) publishLocked() {
	close(f.notify)
	f.notify = make(chan struct{})
}

func (f *fill) startLocked() {
	if !f.startedDone {
		f.startedDone = true
		close(f.started)
	}
}

// fail ends the fill with err for every reader, present and future.
func (f *fill) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil && !f.verified {
		f.err = err
	}
	f.startLocked()
	f.publishLocked()
	if f.spoolPath != "" {
		_ = os.Remove(f.spoolPath) // open readers keep their descriptor
		f.spoolPath = ""
	}
}

// release drops one reference; the last one closes the spool file.
func (f *fill) release() {
	f.mu.Lock()
	f.refs--
	var file *os.File
	if f.refs == 0 {
		file, f.file = f.file, nil
	}
	f.mu.Unlock()
	if file != nil {
		_ = file.Close()
	}
}

// availLocked is how many bytes readers may read now.
func (f *fill) availLocked() int64 {
	switch {
	case f.verified:
		return f.written
	case f.size >= 0:
		return min(f.written, f.size-1)
	default:
		return max(f.written-1, 0)
	}
}

// readAt reads from the spool at off, waiting (on notify or ctx) until the
// fill has passed off. It returns io.EOF at the end of verified content,
// and the fill's error — to every reader — if it failed.
func (f *fill) readAt(ctx context.Context, p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		f.mu.Lock()
		if f.err != nil {
			err := f.err
			f.mu.Unlock()
			return 0, err
		}
		if avail := f.availLocked(); off < avail {
			n := min(int64(len(p)), avail-off)
			file := f.file
			f.mu.Unlock()
			m, err := file.ReadAt(p[:n], off)
			if int64(m) == n {
				err = nil
			} else if err == nil || err == io.EOF {
				err = fmt.Errorf("cache: spool of %s: short read", f.k.d)
			}
			return m, err
		}
		if f.verified {
			f.mu.Unlock()
			return 0, io.EOF
		}
		ch := f.notify
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// sizeNow returns the content size once known (-1 before).
func (f *fill) sizeNow() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.verified {
		return f.written
	}
	return f.size
}

// Blob returns a reader of the blob d.
//
// On a hit it reads the committed entry through the driver. On a miss it
// calls fetch once — whatever the number of concurrent callers for d — and
// every caller streams from the local spool while it fills, each from its
// own offset (Seek/ReadAt), waiting when it is ahead of the fill. Blob
// returns once the upstream has answered (so an upstream error is Blob's
// error, before any byte), with the Reader's Size known when the upstream
// gave it.
//
// The fill runs on its own context (the caller's values, not its
// cancellation) bounded by WithFillTimeout: a caller that goes away does not
// stop it for the others, and when every caller has gone it still finishes
// and commits — which is what warm-up wants. Its digest is verified before
// the last byte is released to any reader and before the spool becomes a
// cache entry; a mismatch, a short or long body, or the deadline fails
// every reader with a *FillError and caches nothing, and the next request
// starts a fresh fill.
//
// A fetch that fails before the body (the upstream refused the starter's
// credential, say) is not taken as the answer for requests that joined
// with their own fetch: they retry with it, so one project's denial never
// fails another's pull. With a nil fetch, a miss is ErrNotFound.
func (c *Cache) Blob(ctx context.Context, d digest.Digest, fetch FetchFunc, opts ...RequestOption) (*Reader, error) {
	if err := validDigest(d); err != nil {
		return nil, err
	}
	o := newRequest(opts)
	k := key{KindBlob, d}
	for attempt := 0; ; attempt++ {
		r, f, own, err := c.openBlob(ctx, k, fetch, o)
		if err != nil || r != nil {
			return r, err
		}
		r, retry, err := c.joinFill(ctx, f, own, fetch != nil, o)
		if retry && attempt < 3 {
			continue
		}
		return r, err
	}
}

// openBlob returns a hit reader, or a fill to read from (own: started by
// this call), taking a reference on it.
func (c *Cache) openBlob(ctx context.Context, k key, fetch FetchFunc, o *request) (*Reader, *fill, bool, error) {
	recentRetried := false
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, nil, false, ErrClosed
		}
		if waited, err := c.waitDeleting(ctx, k); waited {
			c.mu.Unlock()
			if err != nil {
				return nil, nil, false, err
			}
			continue
		}
		if f := c.fills[k]; f != nil {
			f.mu.Lock()
			f.refs++
			f.mu.Unlock()
			c.mu.Unlock()
			if o.in != nil && (f.origin == nil || *f.origin != *o.in) {
				if err := c.ensureLocated(ctx, k, o, nil); err != nil {
					f.release()
					return nil, nil, false, err
				}
			}
			return nil, f, false, nil
		}
		c.inuse[k]++
		c.mu.Unlock()

		r, err := c.openCommitted(ctx, k)
		if err == nil {
			if err := c.ensureLocated(ctx, k, o, nil); err != nil {
				_ = r.Close()
				return nil, nil, false, err
			}
			c.m.Hit(KindBlob, o.labels)
			c.touch(k)
			return r, nil, false, nil
		}
		c.release(k)
		if !isNotFound(err) {
			return nil, nil, false, fmt.Errorf("cache: read %s: %w", k.d, err)
		}

		c.mu.Lock()
		if c.fills[k] != nil {
			c.mu.Unlock()
			continue // started meanwhile: join it
		}
		if _, ok := c.recent[k]; ok && !recentRetried {
			// Committed between our lookup and now.
			recentRetried = true
			c.mu.Unlock()
			continue
		}
		if fetch == nil {
			c.mu.Unlock()
			return nil, nil, false, fmt.Errorf("%w: blob %s", ErrNotFound, k.d)
		}
		if c.closed {
			c.mu.Unlock()
			return nil, nil, false, ErrClosed
		}
		f := c.newFill(ctx, k, o)
		c.fills[k] = f
		c.wg.Add(1)
		c.mu.Unlock()
		if c.cfg.cluster != nil {
			fetch, f.onDone = c.clusterFetch(f, fetch)
		}
		go c.runFill(f, fetch, o.size)
		return nil, f, true, nil
	}
}

// joinFill waits for f's upstream answer and returns a reader of it. retry
// means f failed before any byte with someone else's fetch: the caller
// should try again with its own.
func (c *Cache) joinFill(ctx context.Context, f *fill, own, canFetch bool, o *request) (*Reader, bool, error) {
	select {
	case <-f.started:
	case <-ctx.Done():
		f.release()
		return nil, false, ctx.Err()
	}
	f.mu.Lock()
	err, fetchFailed := f.err, f.fetchFailed
	f.mu.Unlock()
	if err != nil {
		f.release()
		if fetchFailed && !own && canFetch {
			return nil, true, err
		}
		return nil, false, err
	}
	if own {
		c.m.Miss(KindBlob, o.labels)
	} else {
		c.m.Coalesced(KindBlob, o.labels)
	}
	c.mu.Lock()
	c.inuse[f.k]++ // GC leaves it alone until the reader closes
	c.mu.Unlock()
	rctx, cancel := context.WithCancel(ctx)
	return &Reader{c: c, k: f.k, f: f, ctx: rctx, cancel: cancel, size: f.sizeNow(), src: sourceOf(own)}, false, nil
}

func sourceOf(own bool) Source {
	if own {
		return SourceUpstream
	}
	return SourceCoalesced
}

// runFill is the fill goroutine.
func (c *Cache) runFill(f *fill, fetch FetchFunc, expect int64) {
	defer c.wg.Done()
	defer f.cancel()
	err := c.doFill(f, fetch, expect)
	if f.onDone != nil {
		f.onDone()
	}
	if err != nil {
		fe := &FillError{Kind: KindBlob, Digest: f.k.d, Phase: "transfer", Err: err}
		var pe *phaseError
		if errors.As(err, &pe) {
			fe.Phase, fe.Err = pe.phase, pe.err
		}
		if errors.Is(fe.Err, context.Canceled) && c.baseCtx.Err() != nil {
			fe.Err = fmt.Errorf("%w (%v)", ErrClosed, fe.Err)
		}
		f.mu.Lock()
		f.fetchFailed = fe.Phase == "fetch"
		f.mu.Unlock()
		// Gone from fills before its readers learn of the failure: a
		// request after it starts a fill of its own instead of joining
		// this one.
		c.forgetFill(f)
		f.fail(fe)
		c.m.FillFailure(KindBlob, f.labels, failureReason(fe))
		c.log.Warn("cache: fill failed", "kind", KindBlob, "digest", f.k.d, "phase", fe.Phase, "err", fe.Err)
	}
	c.forgetFill(f)
	f.release()
}

func (c *Cache) forgetFill(f *fill) {
	c.mu.Lock()
	if c.fills[f.k] == f {
		delete(c.fills, f.k)
	}
	c.mu.Unlock()
}

type phaseError struct {
	phase string
	err   error
}

func (e *phaseError) Error() string { return e.phase + ": " + e.err.Error() }
func (e *phaseError) Unwrap() error { return e.err }

func failureReason(fe *FillError) string {
	switch {
	case errors.Is(fe.Err, ErrDigestMismatch):
		return "digest"
	case errors.Is(fe.Err, ErrSizeMismatch):
		return "size"
	case errors.Is(fe.Err, ErrManifestTooLarge):
		return "too_large"
	case errors.Is(fe.Err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(fe.Err, ErrClosed), errors.Is(fe.Err, context.Canceled):
		return "canceled"
	case fe.Phase == "fetch":
		return "fetch"
	case fe.Phase == "spool", fe.Phase == "commit":
		return fe.Phase
	}
	return "transfer"
}

func (c *Cache) doFill(f *fill, fetch FetchFunc, expect int64) error {
	ctx := f.ctx
	file, err := os.CreateTemp(c.spoolDir, "fill-")
	if err != nil {
		return &phaseError{"spool", err}
	}
	f.mu.Lock()
	f.file, f.spoolPath = file, file.Name()
	f.mu.Unlock()

	fetched, err := fetch(ctx)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return &phaseError{"fetch", err}
	}
	if fetched.Body == nil {
		return &phaseError{"fetch", errors.New("fetch returned no body")}
	}
	defer fetched.Body.Close()
	// A body that ignores the context (not an HTTP one) is unblocked by
	// closing it at the deadline.
	defer context.AfterFunc(ctx, func() { _ = fetched.Body.Close() })()
	size := fetched.Size
	if expect >= 0 {
		if size >= 0 && size != expect {
			return &phaseError{"fetch", fmt.Errorf("%w: upstream announced %d bytes, expected %d", ErrSizeMismatch, size, expect)}
		}
		size = expect
	}
	f.mu.Lock()
	f.size = size
	f.startLocked()
	f.mu.Unlock()

	written, got, err := c.transfer(f, fetched.Body, file, size)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return err
	}
	if size >= 0 && written != size {
		return fmt.Errorf("%w: upstream sent %d of %d bytes", ErrSizeMismatch, written, size)
	}
	if got != f.k.d {
		return fmt.Errorf("%w: got %s", ErrDigestMismatch, got)
	}

	// Verified: release the held-back tail to every reader.
	f.mu.Lock()
	f.size = written
	f.verified = true
	f.publishLocked()
	f.mu.Unlock()

	if c.cfg.cluster != nil && c.committedElsewhere(ctx, f) {
		// The replica that filled it from the upstream has committed it.
	} else if err := c.commitSpool(ctx, f, file, written); err != nil {
		// The readers have their verified bytes; only the entry is lost.
		c.m.FillFailure(KindBlob, f.labels, "commit")
		c.log.Warn("cache: commit failed", "digest", f.k.d, "err", err)
		return nil
	}
	c.markCommitted(f.k)
	if f.origin != nil {
		if err := c.addLocation(ctx, f.k.d, *f.origin); err != nil {
			c.log.Warn("cache: record location", "digest", f.k.d, "err", err)
		}
	}
	return nil
}

// commitSpool makes the verified spool the cache entry. With the spool
// inside the filesystem driver's root it is a rename (after fsync); with
// any other driver a copy (commitFile).
func (c *Cache) commitSpool(ctx context.Context, f *fill, file *os.File, size int64) error {
	f.mu.Lock()
	spool := f.spoolPath
	f.mu.Unlock()
	if c.spoolRel != "" {
		if err := file.Sync(); err != nil {
			return err
		}
		if commitHook != nil {
			commitHook(f.k)
		}
		rel := c.spoolRel + "/" + filepath.Base(spool)
		if err := c.drv.Move(ctx, rel, dataPath(f.k)); err == nil {
			f.mu.Lock()
			f.spoolPath = "" // it is the entry now
			f.mu.Unlock()
			syncDir(filepath.Join(c.fsRoot, filepath.FromSlash(entryDir(f.k))))
			return nil
		}
		// Fall back to a copy (another file system, say).
	}
	err := c.commitFile(ctx, f.k, io.NewSectionReader(file, 0, size), size)
	f.mu.Lock()
	if f.spoolPath != "" {
		_ = os.Remove(f.spoolPath)
		f.spoolPath = ""
	}
	f.mu.Unlock()
	return err
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// transferDepth is the number of buffers in flight between the three
// stages of a transfer.
const transferDepth = 8

type chunk struct {
	b    []byte
	buf  *[]byte
	refs atomic.Int32
}

// transfer copies the upstream body into the spool and hashes it, as a
// pipeline of three goroutines so that reading the network, writing the
// spool (and publishing each chunk to the readers) and hashing overlap:
// the read loop here, a writer and a hasher. It returns how many bytes the
// body had and their digest.
func (c *Cache) transfer(f *fill, body io.Reader, file *os.File, size int64) (int64, digest.Digest, error) {
	free := make(chan *[]byte, transferDepth)
	for range transferDepth {
		free <- bufPool.Get().(*[]byte)
	}
	// Capacity: never more chunks than buffers, so sends never block.
	writeCh := make(chan *chunk, transferDepth)
	hashCh := make(chan *chunk, transferDepth)
	stop := make(chan struct{})
	release := func(ch *chunk) {
		if ch.refs.Add(-1) == 0 {
			free <- ch.buf
		}
	}
	var wg sync.WaitGroup
	var writeErr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		var written int64
		for ch := range writeCh {
			if writeErr == nil {
				if _, err := file.Write(ch.b); err != nil {
					writeErr = &phaseError{"spool", err}
					close(stop)
				} else {
					written += int64(len(ch.b))
					f.mu.Lock()
					f.written = written
					f.publishLocked()
					f.mu.Unlock()
				}
			}
			release(ch)
		}
	}()
	h := f.k.d.Algorithm().Hash()
	go func() {
		defer wg.Done()
		for ch := range hashCh {
			h.Write(ch.b)
			release(ch)
		}
	}()

	var total int64
	var err error
read:
	for {
		var bp *[]byte
		select {
		case bp = <-free:
		case <-stop:
			break read
		}
		n, rerr := body.Read(*bp)
		if n > 0 && size >= 0 && total+int64(n) > size {
			free <- bp
			err = fmt.Errorf("%w: upstream sent more than the %d bytes announced", ErrSizeMismatch, size)
			break
		}
		if n > 0 {
			total += int64(n)
			ch := &chunk{b: (*bp)[:n], buf: bp}
			ch.refs.Store(2)
			writeCh <- ch
			hashCh <- ch
			c.m.UpstreamBytes(KindBlob, f.labels, int64(n))
		} else {
			free <- bp
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			err = fmt.Errorf("after %d bytes: %w", total, rerr)
			break
		}
	}
	close(writeCh)
	close(hashCh)
	wg.Wait()
	for range transferDepth {
		bufPool.Put(<-free)
	}
	if writeErr != nil {
		return total, "", writeErr
	}
	if err != nil {
		return total, "", err
	}
	return total, digest.NewDigest(f.k.d.Algorithm(), h), nil
}
