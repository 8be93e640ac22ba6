package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/factory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"
	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/internal/s3test"
)

// The cache on distribution's s3-aws driver against a real S3 server
// (versitygw): commits go straight to the final key as multipart uploads.

// s3ChunkSize is the driver's smallest part size: blobs over it are
// uploaded in several parts, so "mid-upload" is a state that exists.
const s3ChunkSize = 5 << 20

// startS3 starts versitygw and returns it with an s3-aws driver on its
// bucket.
func startS3(t testing.TB) (*s3test.Server, storagedriver.StorageDriver) {
	t.Helper()
	srv := s3test.Start(t)
	return srv, newS3Driver(t, srv)
}

func newS3Driver(t testing.TB, srv *s3test.Server) storagedriver.StorageDriver {
	t.Helper()
	p := srv.Parameters()
	p["chunksize"] = s3ChunkSize
	drv, err := factory.Create(context.Background(), "s3aws", p)
	if err != nil {
		t.Fatal(err)
	}
	return drv
}

func openS3Cache(t testing.TB, drv storagedriver.StorageDriver, opts ...Option) *Cache {
	t.Helper()
	opts = append([]Option{WithSpoolDir(t.TempDir())}, opts...)
	c, err := Open(context.Background(), drv, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// objectsOf lists the bucket's objects whose key mentions d.
func objectsOf(t testing.TB, srv *s3test.Server, d digest.Digest) []string {
	t.Helper()
	var out []string
	for _, f := range srv.Files(t) {
		if strings.Contains(f, d.Encoded()) {
			out = append(out, f)
		}
	}
	return out
}

// probeDriver passes every call to the s3-aws driver, except that a
// Writer's Commit first runs onCommit (with the writer's path and size),
// and, with abandon set, then fails as if the process had died: neither
// Commit nor Cancel reaches the server.
type probeDriver struct {
	storagedriver.StorageDriver
	onCommit func(path string, size int64)
	abandon  bool
}

func (p *probeDriver) Writer(ctx context.Context, path string, appendMode bool) (storagedriver.FileWriter, error) {
	w, err := p.StorageDriver.Writer(ctx, path, appendMode)
	if err != nil {
		return nil, err
	}
	return &probeWriter{FileWriter: w, p: p, path: path}, nil
}

type probeWriter struct {
	storagedriver.FileWriter
	p       *probeDriver
	path    string
	written int64 // Size counts what the driver has sent, not what it buffers
}

func (w *probeWriter) Write(b []byte) (int, error) {
	n, err := w.FileWriter.Write(b)
	w.written += int64(n)
	return n, err
}

var errDied = errors.New("process died mid-upload (simulated)")

func (w *probeWriter) Commit(ctx context.Context) error {
	if w.p.onCommit != nil {
		w.p.onCommit(w.path, w.written)
	}
	if w.p.abandon {
		return errDied
	}
	return w.FileWriter.Commit(ctx)
}

func (w *probeWriter) Cancel(ctx context.Context) error {
	if w.p.abandon {
		return errDied
	}
	return w.FileWriter.Cancel(ctx)
}

// A fill on S3: the blob is uploaded to its final key and appears there
// only when the upload completes: at the moment of Commit, every byte has
// been sent, and yet neither a listing, nor a Stat, nor another replica
// sees anything. Then hits read it back through the driver, Range included.
func TestS3FillAndHit(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	const size = 2*s3ChunkSize + 12345 // three parts
	content := randomBytes(size, 31)
	d := digest.FromBytes(content)
	final := dataPath(key{KindBlob, d})

	other := openS3Cache(t, newS3Driver(t, srv)) // another replica on the bucket
	var mu sync.Mutex
	var probed, probeErrs []string
	probe := &probeDriver{StorageDriver: drv, onCommit: func(p string, n int64) {
		mu.Lock()
		defer mu.Unlock()
		probed = append(probed, p)
		if p != final {
			return // a manifest or a sidecar
		}
		if n != size {
			probeErrs = append(probeErrs, "commit before every byte was written")
		}
		if files := objectsOf(t, srv, d); len(files) != 0 {
			probeErrs = append(probeErrs, "objects before Commit: "+strings.Join(files, ", "))
		}
		if _, err := drv.Stat(context.Background(), final); !errors.As(err, new(storagedriver.PathNotFoundError)) {
			probeErrs = append(probeErrs, "Stat of the final key before Commit: no PathNotFoundError")
		}
		if _, err := other.Blob(context.Background(), d, nil); !errors.Is(err, ErrNotFound) {
			probeErrs = append(probeErrs, "another replica before Commit: not ErrNotFound")
		}
	}}
	c := openS3Cache(t, probe)
	if !c.direct {
		t.Fatal("the s3-aws driver is not committed to directly")
	}
	ctx := context.Background()

	r, err := c.Blob(ctx, d, bytesFetch(content, nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	if r.Source() != SourceUpstream {
		t.Fatalf("first request: source %s", r.Source())
	}
	got, n, err := readAllDigest(r)
	_ = r.Close()
	if err != nil || got != d || n != size {
		t.Fatalf("fill: %d bytes, %s, %v", n, got, err)
	}
	waitCommitted(t, c, KindBlob, d)
	mu.Lock()
	if !slices.Contains(probed, final) {
		t.Fatalf("no commit of %s seen (commits: %q)", final, probed)
	}
	for _, e := range probeErrs {
		t.Error(e)
	}
	mu.Unlock()
	if files := objectsOf(t, srv, d); !slices.Equal(files, []string{strings.TrimPrefix(final, "/")}) {
		t.Fatalf("objects after the fill: %q, want only the final key", files)
	}
	for _, f := range srv.Files(t) {
		if strings.HasPrefix(f, "_uploads/") || strings.HasPrefix(f, "_trash/") {
			t.Errorf("upload or trash object on S3: %s", f)
		}
	}

	// Hits, here and on the other replica: the object, read back.
	for name, cc := range map[string]*Cache{"this replica": c, "other replica": other} {
		r, err := cc.Blob(ctx, d, nil)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if r.Source() != SourceCache || r.Size() != size {
			t.Fatalf("%s: source %s, size %d", name, r.Source(), r.Size())
		}
		if got, _, err := readAllDigest(r); err != nil || got != d {
			t.Fatalf("%s: read back %s, %v", name, got, err)
		}
		buf := make([]byte, 1000)
		if _, err := r.ReadAt(buf, s3ChunkSize-500); err != nil || !bytes.Equal(buf, content[s3ChunkSize-500:s3ChunkSize+500]) {
			t.Fatalf("%s: ReadAt across a part boundary: %v", name, err)
		}
		if _, err := r.Seek(size-10, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		if tail, err := io.ReadAll(r); err != nil || !bytes.Equal(tail, content[size-10:]) {
			t.Fatalf("%s: Seek and read the tail: %v", name, err)
		}
		_ = r.Close()
	}

	// A manifest: meta and data, verified on read.
	man := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{"digest":"` + d.String() + `","size":1},"layers":[]}`)
	md := digest.FromBytes(man)
	m, err := c.Manifest(ctx, md, bytesFetch(man, nil, nil))
	if err != nil || !bytes.Equal(m.Content, man) {
		t.Fatalf("manifest fill: %v", err)
	}
	waitCommitted(t, c, KindManifest, md)
	m, err = other.Manifest(ctx, md, nil)
	if err != nil || m.Source != SourceCache || m.MediaType != ociManifest || !bytes.Equal(m.Content, man) {
		t.Fatalf("manifest hit on the other replica: %+v, %v", m, err)
	}
	s, err := other.Stats(ctx)
	if err != nil || s.Blobs.Count != 1 || s.Blobs.Bytes != size || s.Manifests.Count != 1 {
		t.Fatalf("stats: %+v, %v", s, err)
	}
}

// Concurrent requests for one uncached blob make one upstream fetch and one
// upload; every reader streams the whole verified blob.
func TestS3Coalesced(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	const size, readers = 6 << 20, 8
	content := randomBytes(size, 32)
	d := digest.FromBytes(content)
	var uploads int
	var mu sync.Mutex
	c := openS3Cache(t, &probeDriver{StorageDriver: drv, onCommit: func(p string, _ int64) {
		if p == dataPath(key{KindBlob, d}) {
			mu.Lock()
			uploads++
			mu.Unlock()
		}
	}})
	var calls fetchCounter
	gh := newGateHolder(0) // hold the body until every reader has joined
	fetch := bytesFetch(content, &calls, gh.wrap)
	ctx := context.Background()

	var joined, done sync.WaitGroup
	joined.Add(readers)
	done.Add(readers)
	errs := make(chan error, readers)
	sources := make(chan Source, readers)
	for range readers {
		go func() {
			defer done.Done()
			r, err := c.Blob(ctx, d, fetch)
			joined.Done()
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			sources <- r.Source()
			got, _, err := readAllDigest(r)
			if err == nil && got != d {
				err = errors.New("read " + got.String())
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	joined.Wait()
	gh.gate(t).Open(-1)
	done.Wait()
	close(errs)
	close(sources)
	for err := range errs {
		t.Error(err)
	}
	var up, co int
	for s := range sources {
		switch s {
		case SourceUpstream:
			up++
		case SourceCoalesced:
			co++
		}
	}
	if calls.n.Load() != 1 || up != 1 || co != readers-1 {
		t.Fatalf("%d upstream fetches, %d starters, %d coalesced; want 1, 1, %d", calls.n.Load(), up, co, readers-1)
	}
	waitCommitted(t, c, KindBlob, d)
	mu.Lock()
	defer mu.Unlock()
	if uploads != 1 {
		t.Fatalf("%d uploads of the blob, want 1", uploads)
	}
	if files := objectsOf(t, srv, d); len(files) != 1 {
		t.Fatalf("objects: %q", files)
	}
}

// Content that does not match its digest is never uploaded: not from a
// fill (every reader fails), and not from a commit whose bytes changed
// after the fill verified them (the upload is hashed again and aborted).
func TestS3VerifyMismatch(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	c := openS3Cache(t, drv)
	ctx := context.Background()
	const size = s3ChunkSize + 4096
	content := randomBytes(size, 33)
	d := digest.FromBytes(content)
	bad := bytes.Clone(content)
	bad[size-1] ^= 0xff

	r, err := c.Blob(ctx, d, bytesFetch(bad, nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = readAllDigest(r)
	_ = r.Close()
	var fe *FillError
	if !errors.As(err, &fe) || !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("read of corrupt content: %v, want a FillError wrapping ErrDigestMismatch", err)
	}
	waitFor(t, "the fill to end", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.fills[key{KindBlob, d}] == nil
	})
	if files := objectsOf(t, srv, d); len(files) != 0 {
		t.Fatalf("corrupt content left objects: %q", files)
	}
	if _, err := c.Blob(ctx, d, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after a mismatch: %v, want ErrNotFound", err)
	}

	// The commit itself checks what it uploads.
	k := key{KindBlob, d}
	err = c.commitFile(ctx, k, bytes.NewReader(bad), size)
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("commit of bytes that changed: %v, want ErrDigestMismatch", err)
	}
	if _, err := drv.Stat(ctx, dataPath(k)); !errors.As(err, new(storagedriver.PathNotFoundError)) {
		t.Fatalf("final key after a refused commit: %v", err)
	}
	err = c.commitFile(ctx, k, bytes.NewReader(content[:size-1]), size)
	if !errors.Is(err, ErrSizeMismatch) {
		t.Fatalf("commit of a short body: %v, want ErrSizeMismatch", err)
	}
	// The refused uploads were aborted: the server holds no part of them.
	var leftovers []string
	_ = filepath.WalkDir(filepath.Join(srv.Dir, srv.Bucket), func(p string, de os.DirEntry, err error) error {
		if err == nil && !de.IsDir() {
			leftovers = append(leftovers, p)
		}
		return nil
	})
	if len(leftovers) != 0 {
		t.Fatalf("files on the server after aborted uploads: %q", leftovers)
	}

	// The real content still fills and commits.
	r, err = c.Blob(ctx, d, bytesFetch(content, nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := readAllDigest(r); err != nil || got != d {
		t.Fatalf("good fill: %v", err)
	}
	_ = r.Close()
	waitCommitted(t, c, KindBlob, d)
}

// A replica that dies mid-upload — every part sent, the upload never
// completed nor aborted — leaves nothing that any replica serves, and does
// not stand in the way of the next fill.
func TestS3DiesMidUpload(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	const size = 2*s3ChunkSize + 1
	content := randomBytes(size, 34)
	d := digest.FromBytes(content)
	k := key{KindBlob, d}
	ctx := context.Background()

	dying := openS3Cache(t, &probeDriver{StorageDriver: drv, abandon: true})
	r, err := dying.Blob(ctx, d, bytesFetch(content, nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := readAllDigest(r); err != nil || got != d {
		t.Fatalf("readers of the dying replica: %v", err)
	}
	_ = r.Close()
	waitFor(t, "the fill to end", func() bool {
		dying.mu.Lock()
		defer dying.mu.Unlock()
		return dying.fills[k] == nil
	})

	// The parts are on the server (the upload is real and incomplete)...
	var parts int64
	_ = filepath.WalkDir(filepath.Join(srv.Dir, srv.Bucket), func(p string, de os.DirEntry, err error) error {
		if fi, ierr := de.Info(); err == nil && ierr == nil && !de.IsDir() {
			parts += fi.Size()
		}
		return nil
	})
	if parts < 2*s3ChunkSize {
		t.Fatalf("the abandoned upload holds %d bytes on the server; the test did not stop it mid-upload", parts)
	}
	// ...and no object shows it.
	if files := objectsOf(t, srv, d); len(files) != 0 {
		t.Fatalf("objects after a death mid-upload: %q", files)
	}
	other := openS3Cache(t, newS3Driver(t, srv))
	if _, err := other.Blob(ctx, d, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("another replica: %v, want ErrNotFound", err)
	}
	if _, err := other.Stat(ctx, KindBlob, d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stat on another replica: %v, want ErrNotFound", err)
	}
	if s, err := other.Stats(ctx); err != nil || s.Count() != 0 {
		t.Fatalf("stats on another replica: %+v, %v", s, err)
	}

	// The next fill completes its own upload.
	r, err = other.Blob(ctx, d, bytesFetch(content, nil, nil))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, r)
	_ = r.Close()
	waitCommitted(t, other, KindBlob, d)
	rc, err := drv.Reader(ctx, dataPath(k), 0)
	if err != nil {
		t.Fatal(err)
	}
	got, n, err := readAllDigest(rc)
	_ = rc.Close()
	if err != nil || got != d || n != size {
		t.Fatalf("object after the second fill: %d bytes, %s, %v", n, got, err)
	}
}

// GC on S3: least recently used first, the object deleted at once (no
// copy to a trash key), sidecars with it.
func TestS3GC(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	clk := newFakeClock()
	c := openS3Cache(t, drv, WithClock(clk.Now), WithAccessResolution(time.Nanosecond))
	ctx := context.Background()
	const size = 64 << 10
	var ds []digest.Digest
	for i := range 3 {
		ds = append(ds, fillBlob(t, c, randomBytes(size, uint64(40+i))))
		clk.Advance(time.Minute)
	}
	// A hit makes the first one recent; its sidecar goes to S3.
	hit(t, c, ds[0])
	waitFor(t, "the access sidecar", func() bool {
		_, err := drv.Stat(ctx, entryDir(key{KindBlob, ds[0]})+"/"+accessedName)
		return err == nil
	})

	res, err := c.GC(ctx, Policy{MaxSize: 2*size + 1})
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted != 1 || res.Kept != 2 {
		t.Fatalf("gc: %+v, want 1 deleted, 2 kept", res)
	}
	if files := objectsOf(t, srv, ds[1]); len(files) != 0 {
		t.Fatalf("least recently used blob left objects: %q", files)
	}
	for _, d := range []digest.Digest{ds[0], ds[2]} {
		if !committed(c, KindBlob, d) {
			t.Fatalf("blob %s deleted", d)
		}
	}
	if _, err := c.Blob(ctx, ds[1], nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted blob: %v", err)
	}

	clk.Advance(time.Minute)
	res, err = c.GC(ctx, Policy{OlderThan: time.Nanosecond})
	if err != nil || res.Deleted != 2 {
		t.Fatalf("gc of everything: %+v, %v", res, err)
	}
	if files := srv.Files(t); len(files) != 0 {
		t.Fatalf("objects after deleting every entry: %q", files)
	}
}

// Open on S3 removes what dead instances left: their upload keys (from a
// commit through an upload path) and the GC trash; uploads of unknown
// instances once older than the grace. S3 has no directories: a "folder"
// exists while objects under it do.
func TestS3OpenCleansLeftovers(t *testing.T) {
	t.Parallel()
	srv, drv := startS3(t)
	ctx := context.Background()
	spool := t.TempDir()
	// A dead instance of this machine: its spool folder, lock free.
	if err := os.MkdirAll(filepath.Join(spool, "dead0001"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(spool, "dead0001", lockName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{
		"/_uploads/dead0001/r1/data",
		"/_uploads/dead0001/r2/data",
		"/_uploads/far0002/r1/data", // another machine's instance
		"/_trash/t1/data",
	} {
		if err := drv.PutContent(ctx, p, []byte("partial")); err != nil {
			t.Fatal(err)
		}
	}
	c, err := Open(ctx, drv, WithSpoolDir(spool))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	if files := srv.Files(t); !slices.Equal(files, []string{"_uploads/far0002/r1/data"}) {
		t.Fatalf("after Open: %q, want only the young upload of an unknown instance", files)
	}
	if _, err := os.Stat(filepath.Join(spool, "dead0001")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("dead spool kept: %v", err)
	}

	// Two hours later it is stale.
	later := func() time.Time { return time.Now().Add(2 * time.Hour) }
	c, err = Open(ctx, drv, WithSpoolDir(spool), WithClock(later), WithUploadGrace(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.Close()
	if files := srv.Files(t); len(files) != 0 {
		t.Fatalf("after the grace: %q", files)
	}
}
