package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/registry"
)

// Fifty concurrent requests for one cold 64 MiB blob: one upstream fetch,
// every reader streams it while it fills and gets verified bytes; readers
// that start mid-fill at Range offsets get the right slices.
func TestCoalescedColdBlob(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	const readers = 50
	reg := startUpstream(t)
	d := seedBlob(t, reg, "team/app", size, 1)
	want := registry.RandomBlob(1, size)
	counters := &Counters{}
	c, root := newTestCache(t, WithMetrics(counters))
	var calls fetchCounter
	gh := newGateHolder(0) // hold the body until every reader has joined
	fetch := registryFetch(reg, "team/app", d, &calls, gh.wrap)
	ctx := context.Background()

	var joined, done sync.WaitGroup
	joined.Add(readers)
	errs := make(chan error, readers)
	for i := range readers {
		done.Add(1)
		go func() {
			defer done.Done()
			r, err := c.Blob(ctx, d, fetch, In(reg.Host(), "team/app", nil))
			joined.Done()
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			if r.Size() != size {
				errs <- errors.New("wrong size")
				return
			}
			var got digest.Digest
			if i%2 == 0 {
				got, _, err = readAllDigest(r) // Read
			} else {
				got, _, err = readAllDigest(writerToOnly{r}) // WriteTo
			}
			if err != nil {
				errs <- err
				return
			}
			if got != d {
				errs <- errors.New("reader got bytes with digest " + got.String())
			}
		}()
	}
	joined.Wait()
	g := gh.gate(t)

	// Let 16 MiB through, then start Range readers around the fill point.
	g.Open(16 << 20)
	type span struct{ off, n int64 }
	spans := []span{{0, 1 << 20}, {16<<20 - 100, 200}, {20 << 20, 1 << 20}, {size - 4096, 4096}, {size - 1, 1}, {12345, 3 << 20}}
	var rdone sync.WaitGroup
	for _, sp := range spans {
		rdone.Add(1)
		go func() {
			defer rdone.Done()
			r, err := c.Blob(ctx, d, fetch)
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			if r.Source() != SourceCoalesced {
				errs <- errors.New("range reader did not join the fill: " + r.Source().String())
			}
			if _, err := r.Seek(sp.off, io.SeekStart); err != nil {
				errs <- err
				return
			}
			got := make([]byte, sp.n)
			if _, err := io.ReadFull(r, got); err != nil {
				errs <- err
				return
			}
			wantSlice := make([]byte, sp.n)
			rc, _ := want.Compressed()
			_, _ = io.CopyN(io.Discard, rc, sp.off)
			_, _ = io.ReadFull(rc, wantSlice)
			if !bytes.Equal(got, wantSlice) {
				errs <- errors.New("range slice differs")
			}
		}()
	}
	time.Sleep(50 * time.Millisecond) // let some Range readers wait ahead of the fill
	g.Open(-1)
	done.Wait()
	rdone.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if n := calls.n.Load(); n != 1 {
		t.Errorf("fetch called %d times, want 1", n)
	}
	if n := reg.BlobFetches(d.String()); n != 1 {
		t.Errorf("upstream served the blob %d times, want 1", n)
	}
	s := counters.Snapshot()
	if s.Misses[KindBlob] != 1 || s.Coalesced[KindBlob] != readers-1+int64(len(spans)) {
		t.Errorf("misses %d coalesced %d, want 1 and %d", s.Misses[KindBlob], s.Coalesced[KindBlob], readers-1+len(spans))
	}
	if s.UpstreamBytes[KindBlob] != size {
		t.Errorf("upstream bytes %d, want %d", s.UpstreamBytes[KindBlob], size)
	}
	waitCommitted(t, c, KindBlob, d)
	// A later request is a hit, served from the committed entry.
	r, err := c.Blob(ctx, d, nil, In(reg.Host(), "team/app", nil))
	if err != nil {
		t.Fatal(err)
	}
	if r.Source() != SourceCache {
		t.Errorf("source %v, want cache", r.Source())
	}
	got, _, err := readAllDigest(r)
	_ = r.Close()
	if err != nil || got != d {
		t.Fatalf("hit: %v %s", err, got)
	}
	waitFor(t, "spool cleanup", func() bool { return len(spoolFiles(t, root+"/_spool")) == 0 })
}

// writerToOnly makes io.Copy use the Reader's WriteTo.
type writerToOnly struct{ r *Reader }

func (w writerToOnly) Read(p []byte) (int, error)           { return w.r.Read(p) }
func (w writerToOnly) WriteTo(dst io.Writer) (int64, error) { return w.r.WriteTo(dst) }

// The first reader going away (its request context cancelled) does not
// stop the fill for the others; a fill everyone left still commits.
func TestFirstReaderLeaves(t *testing.T) {
	t.Parallel()
	content := randomBytes(4<<20, 2)
	d := digest.FromBytes(content)

	tests := []struct {
		name   string
		others int
	}{
		{"others continue", 3},
		{"everyone leaves", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, _ := newTestCache(t)
			var calls fetchCounter
			gh := newGateHolder(1 << 20)
			fetch := bytesFetch(content, &calls, gh.wrap)
			ctx1, cancel1 := context.WithCancel(context.Background())
			first, err := c.Blob(ctx1, d, fetch)
			if err != nil {
				t.Fatal(err)
			}
			if first.Source() != SourceUpstream {
				t.Fatalf("first source %v", first.Source())
			}
			var others []*Reader
			for range tt.others {
				r, err := c.Blob(context.Background(), d, fetch)
				if err != nil {
					t.Fatal(err)
				}
				others = append(others, r)
			}
			buf := make([]byte, 1<<20)
			if _, err := io.ReadFull(first, buf); err != nil {
				t.Fatal(err)
			}
			// The first reader now waits ahead of the fill; its client goes.
			errc := make(chan error, 1)
			go func() { _, err := first.Read(buf); errc <- err }()
			time.Sleep(20 * time.Millisecond)
			cancel1()
			if err := <-errc; !errors.Is(err, context.Canceled) {
				t.Fatalf("first reader: %v, want context.Canceled", err)
			}
			_ = first.Close()
			gh.gate(t).Open(-1)
			for _, r := range others {
				got, _, err := readAllDigest(r)
				if err != nil || got != d {
					t.Errorf("other reader: %v %s", err, got)
				}
				_ = r.Close()
			}
			waitCommitted(t, c, KindBlob, d)
			if calls.n.Load() != 1 {
				t.Errorf("fetch called %d times", calls.n.Load())
			}
		})
	}
}

// Corrupted or truncated upstream bytes fail every waiter (also one that
// already read bytes), cache nothing, and the next request fetches again
// cleanly.
func TestUpstreamFaults(t *testing.T) {
	t.Parallel()
	const size = 8 << 20
	tests := []struct {
		name  string
		fault registry.Fault
		is    error // nil: any *FillError
	}{
		{"corrupt", registry.Corrupt(size / 2), ErrDigestMismatch},
		{"corrupt last byte", registry.Corrupt(size - 1), ErrDigestMismatch},
		{"truncate", registry.Truncate(size / 3), nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := startUpstream(t)
			d := seedBlob(t, reg, "lib/x", size, uint64(10+i))
			reg.Faults().MustAdd("GET", "/blobs/", tt.fault, registry.Times(1))
			counters := &Counters{}
			c, root := newTestCache(t, WithMetrics(counters))
			gh := newGateHolder(0)
			fetch := registryFetch(reg, "lib/x", d, nil, gh.wrap)
			ctx := context.Background()
			const waiters = 5
			var rs []*Reader
			for range waiters {
				r, err := c.Blob(ctx, d, fetch)
				if err != nil {
					t.Fatal(err)
				}
				rs = append(rs, r)
			}
			g := gh.gate(t)
			g.Open(1 << 20)
			// One reader has bytes already when the failure comes.
			if _, err := io.ReadFull(rs[0], make([]byte, 1<<20-1)); err != nil {
				t.Fatal(err)
			}
			g.Open(-1)
			for i, r := range rs {
				_, n, err := readAllDigest(r)
				var fe *FillError
				if !errors.As(err, &fe) || tt.is != nil && !errors.Is(err, tt.is) {
					t.Errorf("waiter %d: read %d bytes, err %v; want a fill error (%v)", i, n, err, tt.is)
				}
				if n >= size {
					t.Errorf("waiter %d received the whole unverified blob", i)
				}
				_ = r.Close()
			}
			if committed(c, KindBlob, d) {
				t.Fatal("failed fill was cached")
			}
			if _, err := c.Blob(ctx, d, nil); !errors.Is(err, ErrNotFound) {
				t.Fatalf("after failure: %v, want ErrNotFound", err)
			}
			waitFor(t, "spool removal", func() bool { return len(spoolFiles(t, root+"/_spool")) == 0 })
			if counters.Snapshot().FillFailures["digest"]+counters.Snapshot().FillFailures["transfer"] != 1 {
				t.Errorf("fill failures %v", counters.Snapshot().FillFailures)
			}

			// The fault fired once: the next request starts a fresh fill.
			r, err := c.Blob(ctx, d, registryFetch(reg, "lib/x", d, nil, nil))
			if err != nil {
				t.Fatal(err)
			}
			got, _, err := readAllDigest(r)
			_ = r.Close()
			if err != nil || got != d {
				t.Fatalf("retry: %v %s", err, got)
			}
			if n := reg.BlobFetches(d.String()); n != 2 {
				t.Errorf("upstream fetches %d, want 2", n)
			}
			waitCommitted(t, c, KindBlob, d)
		})
	}
}

// Failures of the fill itself: a wrong announced size, a long body, the
// fill deadline, and a fetch error before the body.
func TestFillFailures(t *testing.T) {
	t.Parallel()
	content := randomBytes(1<<20, 3)
	d := digest.FromBytes(content)
	stall := func(rc io.ReadCloser) io.ReadCloser { return newGate(rc, 1000) }
	tests := []struct {
		name  string
		fetch FetchFunc
		opts  []RequestOption
		copts []Option
		is    error
		phase string
	}{
		{"expected size differs", bytesFetch(content, nil, nil), []RequestOption{ExpectSize(5)}, nil, ErrSizeMismatch, "fetch"},
		{"body longer than announced", func(context.Context) (Fetched, error) {
			return Fetched{Body: io.NopCloser(bytes.NewReader(append(bytes.Clone(content), 'x'))), Size: int64(len(content))}, nil
		}, nil, nil, ErrSizeMismatch, "transfer"},
		{"body shorter than announced", func(context.Context) (Fetched, error) {
			return Fetched{Body: io.NopCloser(bytes.NewReader(content[:100])), Size: int64(len(content))}, nil
		}, nil, nil, ErrSizeMismatch, "transfer"},
		{"unknown size, wrong content", func(context.Context) (Fetched, error) {
			return Fetched{Body: io.NopCloser(bytes.NewReader(content[1:])), Size: -1}, nil
		}, nil, nil, ErrDigestMismatch, "transfer"},
		{"deadline", bytesFetch(content, nil, stall), nil, []Option{WithFillTimeout(300 * time.Millisecond)}, context.DeadlineExceeded, "transfer"},
		{"fetch error", func(context.Context) (Fetched, error) {
			return Fetched{}, errors.New("upstream answered 401 Unauthorized")
		}, nil, nil, nil, "fetch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, root := newTestCache(t, tt.copts...)
			r, err := c.Blob(context.Background(), d, tt.fetch, tt.opts...)
			if err == nil {
				_, _, err = readAllDigest(r)
				_ = r.Close()
			}
			var fe *FillError
			if !errors.As(err, &fe) || fe.Phase != tt.phase || tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("err %v, want a %s-phase FillError wrapping %v", err, tt.phase, tt.is)
			}
			if committed(c, KindBlob, d) {
				t.Fatal("cached after a failed fill")
			}
			waitFor(t, "spool removal", func() bool { return len(spoolFiles(t, root+"/_spool")) == 0 })
		})
	}
}

// An upstream that refuses the starter's credential must not fail another
// project that joined with its own fetch: it retries with its own.
func TestFetchErrorNotSharedWithJoiners(t *testing.T) {
	t.Parallel()
	content := randomBytes(1<<20, 4)
	d := digest.FromBytes(content)
	c, _ := newTestCache(t)
	release := make(chan struct{})
	denied := func(ctx context.Context) (Fetched, error) {
		<-release
		return Fetched{}, errors.New("upstream answered 401 Unauthorized")
	}
	var okCalls fetchCounter
	errc := make(chan error, 1)
	go func() {
		_, err := c.Blob(context.Background(), d, denied)
		errc <- err
	}()
	waitFor(t, "first fill", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.fills) == 1
	})
	rc := make(chan *Reader, 1)
	go func() {
		r, err := c.Blob(context.Background(), d, bytesFetch(content, &okCalls, nil))
		if err != nil {
			t.Error(err)
		}
		rc <- r
	}()
	time.Sleep(20 * time.Millisecond) // the second request joins the first fill
	close(release)
	if err := <-errc; err == nil {
		t.Fatal("the denied request succeeded")
	}
	r := <-rc
	if r == nil {
		t.FailNow()
	}
	defer r.Close()
	got, _, err := readAllDigest(r)
	if err != nil || got != d {
		t.Fatalf("joiner: %v %s", err, got)
	}
	if okCalls.n.Load() != 1 {
		t.Fatalf("joiner's fetch called %d times", okCalls.n.Load())
	}
}

// Readers of a committed entry: Seek, ReadAt, WriteTo from an offset, and
// Read after Close.
func TestHitReader(t *testing.T) {
	t.Parallel()
	content := randomBytes(3<<20+17, 5)
	d := digest.FromBytes(content)
	for _, open := range []string{"filesystem", "generic driver"} {
		t.Run(open, func(t *testing.T) {
			t.Parallel()
			var c *Cache
			if open == "filesystem" {
				c, _ = newTestCache(t)
			} else {
				c = newInmemoryCache(t)
			}
			ctx := context.Background()
			r, err := c.Blob(ctx, d, bytesFetch(content, nil, nil))
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, r)
			_ = r.Close()
			waitCommitted(t, c, KindBlob, d)

			r, err = c.Blob(ctx, d, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Source() != SourceCache || r.Size() != int64(len(content)) || r.Digest() != d {
				t.Fatalf("source %v size %d digest %s", r.Source(), r.Size(), r.Digest())
			}
			p := make([]byte, 1000)
			if _, err := r.ReadAt(p, 2<<20); err != nil || !bytes.Equal(p, content[2<<20:2<<20+1000]) {
				t.Fatalf("ReadAt: %v", err)
			}
			if _, err := r.Seek(-100, io.SeekEnd); err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			if n, err := r.WriteTo(&buf); err != nil || n != 100 || !bytes.Equal(buf.Bytes(), content[len(content)-100:]) {
				t.Fatalf("WriteTo from the end: %d %v", n, err)
			}
			if _, err := r.Seek(1<<20, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			rest, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(rest, content[1<<20:]) {
				t.Fatalf("Read after Seek: %v", err)
			}
			if n, err := r.Read(p); n != 0 || err != io.EOF {
				t.Fatalf("Read at the end: %d %v", n, err)
			}
			_ = r.Close()
			if _, err := r.Read(p); err == nil {
				t.Fatal("Read after Close succeeded")
			}
		})
	}
}

// Empty blobs (the empty layer) and blobs of unknown size go through the
// same fill.
func TestEdgeSizes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		content []byte
		size    int64 // announced
	}{
		{"empty", nil, 0},
		{"empty, size unknown", nil, -1},
		{"one byte", []byte{7}, 1},
		{"size unknown", randomBytes(1<<20+3, 9), -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, _ := newTestCache(t)
			d := digest.FromBytes(tc.content)
			fetch := func(context.Context) (Fetched, error) {
				return Fetched{Body: io.NopCloser(bytes.NewReader(tc.content)), Size: tc.size}, nil
			}
			for _, pass := range []string{"fill", "hit"} {
				r, err := c.Blob(context.Background(), d, fetch)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(r)
				if err != nil || !bytes.Equal(got, tc.content) || r.Size() != int64(len(tc.content)) {
					t.Fatalf("%s: %d bytes, size %d, %v", pass, len(got), r.Size(), err)
				}
				_ = r.Close()
				waitCommitted(t, c, KindBlob, d)
			}
		})
	}
}
