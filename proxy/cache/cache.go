package cache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"
)

// Kind is what a cache entry holds.
type Kind string

const (
	KindBlob     Kind = "blob"
	KindManifest Kind = "manifest"
)

// Source tells where a request's content came from.
type Source int

const (
	// SourceCache: a committed, verified cache entry (a hit).
	SourceCache Source = iota
	// SourceUpstream: this request started the upstream fetch (a miss).
	SourceUpstream
	// SourceCoalesced: this request joined a fetch another request had
	// started, and streams from its spool.
	SourceCoalesced
)

func (s Source) String() string {
	switch s {
	case SourceCache:
		return "cache"
	case SourceUpstream:
		return "upstream"
	case SourceCoalesced:
		return "coalesced"
	}
	return "unknown"
}

// Fetched is what a FetchFunc returns: the upstream response body, its size
// (-1 when the upstream did not say) and, for manifests, its media type.
type Fetched struct {
	Body      io.ReadCloser
	Size      int64
	MediaType string
}

// FetchFunc fetches content from the upstream. It is called at most once
// per digest at a time, whatever the number of concurrent requests, with the
// fill's own context (not the caller's): it must use ctx for its request so
// the fill deadline and Close stop it. The cache closes Body.
type FetchFunc func(ctx context.Context) (Fetched, error)

// Descriptor describes cached content.
type Descriptor struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType,omitempty"`
	Size      int64         `json:"size"`
	// Fetched is when the upstream last confirmed a tag (tag entries only).
	Fetched time.Time `json:"fetched,omitzero"`
}

// Defaults.
const (
	DefaultTagTTL           = time.Minute
	DefaultFillTimeout      = time.Hour
	DefaultMaxManifestSize  = 4 << 20
	DefaultUploadGrace      = time.Hour
	DefaultAccessResolution = time.Minute
)

// Option configures Open.
type Option func(*config)

type config struct {
	spoolDir         string
	fillTimeout      time.Duration
	tagTTL           time.Duration
	uploadGrace      time.Duration
	accessResolution time.Duration
	maxManifest      int64
	metrics          Metrics
	log              *slog.Logger
	now              func() time.Time
	cluster          *Cluster
}

// WithSpoolDir puts the local spool files of in-flight fills in dir. The
// default is <root>/_spool for OpenFilesystem (on the same file system, so a
// verified spool becomes the cache entry by a rename) and
// $TMPDIR/pullsecret-cache-spool for other drivers.
func WithSpoolDir(dir string) Option { return func(c *config) { c.spoolDir = dir } }

// WithFillTimeout bounds every upstream fill (default 1h). The fill runs on
// its own context with this deadline, not on the context of the request
// that started it.
func WithFillTimeout(d time.Duration) Option { return func(c *config) { c.fillTimeout = d } }

// WithTagTTL sets the default revalidation interval of ResolveTag
// (default 1m, the tag_ttl setting).
func WithTagTTL(d time.Duration) Option { return func(c *config) { c.tagTTL = d } }

// WithUploadGrace sets how old an upload temp directory of another,
// unknown instance must be before Open removes it (default 1h). Uploads of
// an instance on this machine whose process is gone are removed at once,
// whatever their age. Replicas sharing an object store must keep this longer
// than their longest commit.
func WithUploadGrace(d time.Duration) Option { return func(c *config) { c.uploadGrace = d } }

// WithAccessResolution sets how often, at most, the last-access time of one
// entry is written to its sidecar in the driver (default 1m). GC sees access
// times of other processes at this resolution.
func WithAccessResolution(d time.Duration) Option {
	return func(c *config) { c.accessResolution = d }
}

// WithMaxManifestSize sets the largest manifest accepted (default 4 MiB).
func WithMaxManifestSize(n int64) Option { return func(c *config) { c.maxManifest = n } }

// WithMetrics reports hits, misses, coalesced waiters, upstream bytes,
// stale serves and fill failures to m (see NewPrometheus).
func WithMetrics(m Metrics) Option { return func(c *config) { c.metrics = m } }

// WithLogger logs fill failures, stale serves, GC runs and cleanup to l
// (never a credential: the cache never sees one).
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.log = l } }

// WithClock sets the clock used for tag ages, access times and GC.
func WithClock(now func() time.Time) Option { return func(c *config) { c.now = now } }

// Cache is a content-addressed blob and manifest cache with coalesced
// streaming fills, a tag index and content locations, on a distribution
// storage driver. It is safe for concurrent use. See the package
// documentation.
type Cache struct {
	drv storagedriver.StorageDriver
	cfg config
	log *slog.Logger
	now func() time.Time
	m   Metrics

	instance string
	spoolDir string   // this instance's spool directory (local)
	spoolRel string   // its driver path when it lies inside the filesystem driver's root, else ""
	fsRoot   string   // the filesystem driver's root (OpenFilesystem), else ""
	lock     *os.File // flock held on spoolDir/.lock while open
	// direct: the driver's Writer publishes nothing before Commit, so
	// commits write the final path itself (see commit.go).
	direct bool

	baseCtx   context.Context
	cancelAll context.CancelFunc
	wg        sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	fills    map[key]*fill
	mfills   map[key]*mfill
	inuse    map[key]int
	deleting map[key]chan struct{}
	recent   map[key]time.Time // committed lately, by this instance
	access   map[key]*accessInfo
	located  map[string]struct{} // location links known to exist
}

type key struct {
	kind Kind
	d    digest.Digest
}

type accessInfo struct {
	last, persisted time.Time
}

// OpenFilesystem opens (creating it if needed) a cache stored under root
// with distribution's filesystem driver. Spool files live in root/_spool,
// so a verified fill becomes a cache entry by a rename.
func OpenFilesystem(ctx context.Context, root string, opts ...Option) (*Cache, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("cache: root %s: %w", root, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("cache: root: %w", err)
	}
	drv := filesystem.New(filesystem.DriverParameters{RootDirectory: abs, MaxThreads: 100})
	return open(ctx, drv, abs, opts)
}

// Open opens a cache on any distribution storage driver (s3-aws, gcs,
// azure, inmemory, filesystem). Verified fills are copied from the local
// spool into the driver: on s3-aws straight to the final path, published
// by the upload's completion; on other drivers through an upload path,
// then moved into place (see commit.go).
func Open(ctx context.Context, drv storagedriver.StorageDriver, opts ...Option) (*Cache, error) {
	return open(ctx, drv, "", opts)
}

func open(ctx context.Context, drv storagedriver.StorageDriver, fsRoot string, opts []Option) (*Cache, error) {
	cfg := config{
		fillTimeout:      DefaultFillTimeout,
		tagTTL:           DefaultTagTTL,
		uploadGrace:      DefaultUploadGrace,
		accessResolution: DefaultAccessResolution,
		maxManifest:      DefaultMaxManifestSize,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.log == nil {
		cfg.log = slog.New(slog.DiscardHandler)
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	if cfg.metrics == nil {
		cfg.metrics = nopMetrics{}
	}
	c := &Cache{
		drv:      drv,
		cfg:      cfg,
		log:      cfg.log,
		now:      cfg.now,
		m:        cfg.metrics,
		instance: randomID(),
		fills:    map[key]*fill{},
		mfills:   map[key]*mfill{},
		inuse:    map[key]int{},
		deleting: map[key]chan struct{}{},
		recent:   map[key]time.Time{},
		access:   map[key]*accessInfo{},
		located:  map[string]struct{}{},
		direct:   directCommit(drv),
	}
	spoolBase := cfg.spoolDir
	if spoolBase == "" {
		if fsRoot != "" {
			spoolBase = filepath.Join(fsRoot, spoolDirName)
		} else {
			spoolBase = filepath.Join(os.TempDir(), "pullsecret-cache-spool")
		}
	}
	spoolBase, err := filepath.Abs(spoolBase)
	if err != nil {
		return nil, fmt.Errorf("cache: spool dir: %w", err)
	}
	if fsRoot != "" {
		if rel, err := filepath.Rel(fsRoot, spoolBase); err == nil && !strings.HasPrefix(rel, "..") && rel != "." {
			c.fsRoot = fsRoot
			c.spoolRel = "/" + filepath.ToSlash(rel) + "/" + c.instance
		}
	}
	if err := os.MkdirAll(spoolBase, 0o700); err != nil {
		return nil, fmt.Errorf("cache: spool dir: %w", err)
	}
	dead := c.cleanSpools(spoolBase)
	// The instance directory appears under its name already locked, so a
	// concurrent Open never mistakes it for the spool of a dead process.
	tmp, err := os.MkdirTemp(spoolBase, ".new-")
	if err != nil {
		return nil, fmt.Errorf("cache: spool dir: %w", err)
	}
	if c.lock, err = lockInstance(filepath.Join(tmp, lockName)); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("cache: lock spool dir: %w", err)
	}
	c.spoolDir = filepath.Join(spoolBase, c.instance)
	if err := os.Rename(tmp, c.spoolDir); err != nil {
		_ = c.lock.Close()
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("cache: spool dir: %w", err)
	}
	c.cleanDriver(ctx, spoolBase, dead)
	c.baseCtx, c.cancelAll = context.WithCancel(context.WithoutCancel(ctx))
	return c, nil
}

// Close stops in-flight fills (their waiters get an error wrapping
// ErrClosed), waits for them, and releases the spool directory. Readers
// already open on committed entries keep working until closed.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.cancelAll()
	c.wg.Wait()
	err := os.RemoveAll(c.spoolDir)
	if c.lock != nil {
		_ = c.lock.Close()
	}
	return err
}

// Driver returns the storage driver the cache is on.
func (c *Cache) Driver() storagedriver.StorageDriver { return c.drv }

// Storage layout (driver paths):
//
//	/blobs/<alg>/<hex[:2]>/<hex>/data          blob content (final path: only verified content is ever here)
//	/blobs/<alg>/<hex[:2]>/<hex>/accessed      last access time (RFC 3339), best effort
//	/manifests/<alg>/<hex[:2]>/<hex>/data      manifest content
//	/manifests/<alg>/<hex[:2]>/<hex>/meta      {"mediaType","size"}, written before data
//	/manifests/<alg>/<hex[:2]>/<hex>/accessed
//	/repos/<host>/<repo>/_tags/<tag>           tag entry (JSON Descriptor + key)
//	/repos/<host>/<repo>/_digests/<alg>/<hex>  location: the digest is in this repository upstream
//	/_uploads/<instance>/<random>/data         commit in progress (never read; not on s3-aws)
//	/_trash/<random>/data                      GC: moved out of the final path, then deleted (not on s3-aws)
//	/_spool/<instance>/<random>                spool files (OpenFilesystem only; local otherwise)
//
// <host> is the upstream host escaped into one path component.
const (
	spoolDirName = "_spool"
	uploadsDir   = "/_uploads"
	trashDir     = "/_trash"
	lockName     = ".lock"
	dataName     = "data"
	metaName     = "meta"
	accessedName = "accessed"
)

func kindRoot(k Kind) string {
	if k == KindManifest {
		return "/manifests"
	}
	return "/blobs"
}

func entryDir(k key) string {
	enc := k.d.Encoded()
	return path.Join(kindRoot(k.kind), string(k.d.Algorithm()), enc[:2], enc)
}

func dataPath(k key) string { return entryDir(k) + "/" + dataName }

// validDigest accepts digests whose algorithm the cache can verify.
func validDigest(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("%w: digest %q: %v", ErrInvalidName, d, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var nf storagedriver.PathNotFoundError
	if errors.As(err, &nf) {
		return true
	}
	return errors.Is(err, os.ErrNotExist)
}

func randomID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// cleanSpools removes the spool directories of instances that are gone (a
// process killed during a fill): their lock is free. It returns their ids,
// whose upload directories in the driver are garbage too.
func (c *Cache) cleanSpools(base string) map[string]bool {
	dead := map[string]bool{}
	ents, err := os.ReadDir(base)
	if err != nil {
		c.log.Warn("cache: list spool dir", "err", err)
		return dead
	}
	for _, e := range ents {
		p := filepath.Join(base, e.Name())
		if !e.IsDir() {
			// Not ours: a spool file is only ever inside an instance
			// directory.
			continue
		}
		if strings.HasPrefix(e.Name(), ".") {
			// An instance directory being created (see open); one left
			// behind by a crash at that very moment goes after an hour.
			if fi, err := e.Info(); err == nil && c.now().Sub(fi.ModTime()) > time.Hour {
				_ = os.RemoveAll(p)
			}
			continue
		}
		if !instanceDead(filepath.Join(p, lockName)) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			c.log.Warn("cache: remove stale spool", "dir", p, "err", err)
			continue
		}
		dead[e.Name()] = true
		c.log.Info("cache: removed stale spool of a stopped process", "instance", e.Name())
	}
	return dead
}

// cleanDriver removes upload directories of dead instances (and of unknown
// instances older than the upload grace) and the GC trash.
func (c *Cache) cleanDriver(ctx context.Context, spoolBase string, dead map[string]bool) {
	ups, err := c.drv.List(ctx, uploadsDir)
	if err != nil && !isNotFound(err) {
		c.log.Warn("cache: list uploads", "err", err)
	}
	for _, u := range ups {
		id := path.Base(u)
		remove := dead[id]
		if !remove {
			if _, err := os.Stat(filepath.Join(spoolBase, id)); err == nil {
				continue // a live instance on this machine
			}
			remove = c.olderThan(ctx, u, c.cfg.uploadGrace)
		}
		if remove {
			if err := c.drv.Delete(ctx, u); err != nil && !isNotFound(err) {
				c.log.Warn("cache: remove stale upload", "path", u, "err", err)
			}
		}
	}
	if err := c.drv.Delete(ctx, trashDir); err != nil && !isNotFound(err) {
		c.log.Warn("cache: empty trash", "err", err)
	}
}

// olderThan reports whether every file under dir was last modified more
// than age ago.
func (c *Cache) olderThan(ctx context.Context, dir string, age time.Duration) bool {
	cutoff := c.now().Add(-age)
	newest := time.Time{}
	err := c.drv.Walk(ctx, dir, func(fi storagedriver.FileInfo) error {
		if !fi.IsDir() && fi.ModTime().After(newest) {
			newest = fi.ModTime()
		}
		return nil
	})
	if err != nil && !isNotFound(err) {
		return false
	}
	return newest.Before(cutoff)
}

// touch records an access to k (in memory, and in the sidecar at most once
// per access resolution).
func (c *Cache) touch(k key) {
	now := c.now()
	c.mu.Lock()
	ai := c.access[k]
	if ai == nil {
		ai = &accessInfo{}
		c.access[k] = ai
	}
	if now.After(ai.last) {
		ai.last = now
	}
	persist := !c.closed && now.Sub(ai.persisted) >= c.cfg.accessResolution
	if persist {
		ai.persisted = now
		c.wg.Add(1)
	}
	c.mu.Unlock()
	if persist {
		go func() {
			defer c.wg.Done()
			// Best effort: GC falls back to the data's modification time.
			ctx, cancel := context.WithTimeout(c.baseCtx, 30*time.Second)
			defer cancel()
			if _, err := c.drv.Stat(ctx, dataPath(k)); err != nil {
				return // deleted meanwhile: do not leave an orphan sidecar
			}
			_ = c.drv.PutContent(ctx, entryDir(k)+"/"+accessedName, []byte(now.UTC().Format(time.RFC3339Nano)))
		}()
	}
}

// markCommitted records a fresh commit: its access time (the data's
// modification time stands for it in the driver) and that it is there,
// so a request racing with the end of the fill does not start another.
func (c *Cache) markCommitted(k key) {
	now := c.now()
	c.mu.Lock()
	c.access[k] = &accessInfo{last: now, persisted: now}
	for rk, t := range c.recent {
		if now.Sub(t) > time.Minute {
			delete(c.recent, rk)
		}
	}
	c.recent[k] = now
	c.mu.Unlock()
}

// waitDeleting blocks while GC is deleting k. It must be called with c.mu
// held; it returns with c.mu held, true if it had to wait (so the caller
// re-checks its state).
func (c *Cache) waitDeleting(ctx context.Context, k key) (bool, error) {
	ch := c.deleting[k]
	if ch == nil {
		return false, nil
	}
	c.mu.Unlock()
	defer c.mu.Lock()
	select {
	case <-ch:
		return true, nil
	case <-ctx.Done():
		return true, ctx.Err()
	}
}

func (c *Cache) release(k key) {
	c.mu.Lock()
	if c.inuse[k]--; c.inuse[k] <= 0 {
		delete(c.inuse, k)
	}
	c.mu.Unlock()
}
