package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/go-digest"
	"github.com/pullsecret/pullsecret/registry"
)

// newTestCache opens a filesystem cache in a fresh temporary root.
func newTestCache(t testing.TB, opts ...Option) (*Cache, string) {
	t.Helper()
	root := t.TempDir()
	c, err := OpenFilesystem(context.Background(), root, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, root
}

// newInmemoryCache opens a cache on distribution's inmemory driver: the
// generic commit path (upload, Commit, Move).
func newInmemoryCache(t testing.TB, opts ...Option) *Cache {
	t.Helper()
	opts = append([]Option{WithSpoolDir(t.TempDir())}, opts...)
	c, err := Open(context.Background(), inmemory.New(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// startUpstream starts an in-process registry on the filesystem driver.
func startUpstream(t testing.TB) *registry.Registry {
	t.Helper()
	reg, err := registry.Start(context.Background(), registry.WithFilesystem(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	return reg
}

// seedBlob pushes size deterministic pseudo-random bytes to repo.
func seedBlob(t testing.TB, reg *registry.Registry, repo string, size int64, seed uint64) digest.Digest {
	t.Helper()
	h, err := reg.SeedBlob(context.Background(), repo, size, registry.RandSeed(seed))
	if err != nil {
		t.Fatal(err)
	}
	return digest.Digest(h.String())
}

// randomBytes returns n deterministic bytes.
func randomBytes(n int, seed uint64) []byte {
	var key [32]byte
	key[0] = byte(seed)
	key[1] = byte(seed >> 8)
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(key).Read(b)
	return b
}

// fetchCounter counts FetchFunc calls.
type fetchCounter struct{ n atomic.Int32 }

// registryFetch fetches repo's blob d from reg, like the proxy does; wrap
// may wrap the body (a gate, say).
func registryFetch(reg *registry.Registry, repo string, d digest.Digest, calls *fetchCounter, wrap func(io.ReadCloser) io.ReadCloser) FetchFunc {
	return func(ctx context.Context) (Fetched, error) {
		if calls != nil {
			calls.n.Add(1)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, reg.URL()+"/v2/"+repo+"/blobs/"+d.String(), nil)
		if err != nil {
			return Fetched{}, err
		}
		resp, err := reg.Client().Do(req)
		if err != nil {
			return Fetched{}, Unavailable(err)
		}
		if resp.StatusCode != http.StatusOK {
			_ = resp.Body.Close()
			err := fmt.Errorf("upstream answered %s", resp.Status)
			if StatusAllowsStale(resp.StatusCode) {
				err = Unavailable(err)
			}
			return Fetched{}, err
		}
		body := resp.Body
		if wrap != nil {
			body = wrap(body)
		}
		return Fetched{Body: body, Size: resp.ContentLength}, nil
	}
}

// bytesFetch serves content from memory.
func bytesFetch(content []byte, calls *fetchCounter, wrap func(io.ReadCloser) io.ReadCloser) FetchFunc {
	return func(ctx context.Context) (Fetched, error) {
		if calls != nil {
			calls.n.Add(1)
		}
		var body io.ReadCloser = io.NopCloser(bytes.NewReader(content))
		if wrap != nil {
			body = wrap(body)
		}
		return Fetched{Body: body, Size: int64(len(content))}, nil
	}
}

// gate passes the bytes of r up to a limit the test raises; beyond it Read
// blocks until Open or Close.
type gate struct {
	r      io.ReadCloser
	mu     sync.Mutex
	cond   *sync.Cond
	limit  int64
	pos    int64
	closed bool
}

func newGate(r io.ReadCloser, limit int64) *gate {
	g := &gate{r: r, limit: limit}
	g.cond = sync.NewCond(&g.mu)
	return g
}

func (g *gate) Read(p []byte) (int, error) {
	g.mu.Lock()
	for g.pos >= g.limit && !g.closed {
		g.cond.Wait()
	}
	if g.closed {
		g.mu.Unlock()
		return 0, errors.New("gate closed")
	}
	n := min(int64(len(p)), g.limit-g.pos)
	g.mu.Unlock()
	m, err := g.r.Read(p[:n])
	g.mu.Lock()
	g.pos += int64(m)
	g.mu.Unlock()
	return m, err
}

// Open raises the limit to n bytes (-1: everything).
func (g *gate) Open(n int64) {
	g.mu.Lock()
	if n < 0 {
		n = 1 << 62
	}
	g.limit = n
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *gate) Close() error {
	g.mu.Lock()
	g.closed = true
	g.cond.Broadcast()
	g.mu.Unlock()
	return g.r.Close()
}

// gateHolder captures the gate of a fetch.
type gateHolder struct {
	mu    sync.Mutex
	g     *gate
	ready chan struct{}
	limit int64
}

func newGateHolder(limit int64) *gateHolder {
	return &gateHolder{ready: make(chan struct{}), limit: limit}
}

func (h *gateHolder) wrap(rc io.ReadCloser) io.ReadCloser {
	g := newGate(rc, h.limit)
	h.mu.Lock()
	h.g = g
	h.mu.Unlock()
	close(h.ready)
	return g
}

func (h *gateHolder) gate(t testing.TB) *gate {
	t.Helper()
	select {
	case <-h.ready:
	case <-time.After(30 * time.Second):
		t.Fatal("fetch never started")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.g
}

// readAllDigest reads r to the end and returns the digest of what it read.
func readAllDigest(r io.Reader) (digest.Digest, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return digest.NewDigest(digest.SHA256, h), n, err
}

// waitFor polls cond (tests only) until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// committed reports whether the blob's final path exists.
func committed(c *Cache, kind Kind, d digest.Digest) bool {
	_, err := c.drv.Stat(context.Background(), dataPath(key{kind, d}))
	return err == nil
}

// waitCommitted waits until d is committed and its fill has finished (so
// that the next request is a hit).
func waitCommitted(t testing.TB, c *Cache, kind Kind, d digest.Digest) {
	t.Helper()
	waitFor(t, "commit", func() bool {
		c.mu.Lock()
		k := key{kind, d}
		busy := c.fills[k] != nil || c.mfills[k] != nil
		c.mu.Unlock()
		return !busy && committed(c, kind, d)
	})
}

// spoolFiles lists the files under root/_spool, lock files excluded.
func spoolFiles(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	_ = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err == nil && !de.IsDir() && de.Name() != lockName {
			out = append(out, p)
		}
		return nil
	})
	return out
}
