package registry

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// start starts a registry that is closed when the test ends.
func start(t *testing.T, opts ...Option) *Registry {
	t.Helper()
	r, err := Start(t.Context(), opts...)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// pull fetches ref from r with go-containerregistry and reads every blob,
// which makes go-containerregistry verify their digests.
func pull(r *Registry, ref string, auth authn.Authenticator) (v1.Image, error) {
	if auth == nil {
		auth = authn.Anonymous
	}
	parsed, err := name.ParseReference(ref)
	if err != nil {
		return nil, err
	}
	img, err := remote.Image(parsed, remote.WithAuth(auth), remote.WithTransport(r.Transport()))
	if err != nil {
		return nil, err
	}
	return img, readAll(img)
}

func readAll(img v1.Image) error {
	ls, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range ls {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	_, err = img.RawConfigFile()
	return err
}

func digestOf(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func statusOf(err error) int {
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode
	}
	return 0
}

func TestStartRejects(t *testing.T) {
	t.Parallel()
	for name, opts := range map[string][]Option{
		"htpasswd and token":   {WithHTPasswd(map[string]string{"u": "p"}), WithTokenAuth(map[string]string{"u": "p"})},
		"user with colon":      {WithHTPasswd(map[string]string{"a:b": "p"})},
		"reserved seed user":   {WithTokenAuth(map[string]string{seedUser: "p"})},
		"empty user":           {WithHTPasswd(map[string]string{"": "p"})},
		"address in use":       nil, // filled in below
		"filesystem not a dir": {WithFilesystem("/dev/null/x")},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if name == "address in use" {
				other := start(t)
				opts = []Option{WithAddr(other.Addr())}
			}
			r, err := Start(t.Context(), opts...)
			if err == nil {
				r.Close()
				t.Fatal("no error")
			}
		})
	}
}

func TestAddrURLRef(t *testing.T) {
	t.Parallel()
	r := start(t)
	if !strings.HasPrefix(r.Addr(), "127.0.0.1:") || r.Host() != r.Addr() {
		t.Errorf("Addr %q Host %q", r.Addr(), r.Host())
	}
	if r.URL() != "http://"+r.Addr() {
		t.Errorf("URL %q", r.URL())
	}
	if got, want := r.Ref("t/app", "v1"), r.Addr()+"/t/app:v1"; got != want {
		t.Errorf("Ref = %q, want %q", got, want)
	}
	d := "sha256:" + strings.Repeat("a", 64)
	if got, want := r.Ref("t/app", d), r.Addr()+"/t/app@"+d; got != want {
		t.Errorf("Ref = %q, want %q", got, want)
	}
	if r.CAFile() != "" || r.CACertPEM() != nil || r.CertPool() != nil {
		t.Error("TLS material without WithTLS")
	}
}

func TestCloseRemovesTempFilesAndIsIdempotent(t *testing.T) {
	t.Parallel()
	r, err := Start(t.Context(), WithTLS(), WithHTPasswd(map[string]string{"u": "p"}))
	if err != nil {
		t.Fatal(err)
	}
	dir := r.dir
	if _, err := os.Stat(r.CAFile()); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temp dir still there: %v", err)
	}
	if _, err := http.Get(r.URL() + "/v2/"); err == nil {
		t.Error("server still answers after Close")
	}
}

func TestFilesystemStoragePersists(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r1, err := Start(t.Context(), WithFilesystem(dir))
	if err != nil {
		t.Fatal(err)
	}
	img, err := r1.SeedRandom(t.Context(), "t/app", "v1", Layers(2))
	if err != nil {
		t.Fatal(err)
	}
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "docker/registry/v2/repositories/t/app")); err != nil {
		t.Fatalf("repository not on disk: %v", err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("Close removed the filesystem root: %v", err)
	}

	r2 := start(t, WithFilesystem(dir))
	got, err := pull(r2, r2.Ref("t/app", "v1"), nil)
	if err != nil {
		t.Fatalf("pull from a new registry on the same root: %v", err)
	}
	if digestOf(t, got) != digestOf(t, img) {
		t.Error("digest changed across registries")
	}
}

func TestHandlerWrapperAndLogger(t *testing.T) {
	t.Parallel()
	const canary = "canary-Pa55w0rd-7f3e"
	var wrapped atomic.Int64
	var logs syncBuffer
	r := start(t,
		WithHTPasswd(map[string]string{"u": canary}),
		WithHandlerWrapper(func(h http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
				wrapped.Add(1)
				h.ServeHTTP(w, req)
			})
		}),
		WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))),
	)
	if _, err := r.SeedRandom(t.Context(), "t/app", "v1"); err != nil {
		t.Fatal(err)
	}
	if wrapped.Load() != 0 {
		t.Errorf("seeding went through the wrapper %d times", wrapped.Load())
	}
	if _, err := pull(r, r.Ref("t/app", "v1"), &authn.Basic{Username: "u", Password: canary}); err != nil {
		t.Fatal(err)
	}
	if n := int(wrapped.Load()); n != len(r.Requests()) || n == 0 {
		t.Errorf("wrapper saw %d requests, log has %d", n, len(r.Requests()))
	}
	out := logs.String()
	if !strings.Contains(out, "/v2/t/app/manifests/v1") {
		t.Errorf("request not logged:\n%s", out)
	}
	if strings.Contains(out, canary) || strings.Contains(out, "Basic ") {
		t.Errorf("credential in log:\n%s", out)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestSeveralRegistries runs registries of every kind side by side and checks
// that nothing leaks between them.
func TestSeveralRegistries(t *testing.T) {
	t.Parallel()
	users := map[string]string{"u": "p"}
	kinds := [][]Option{
		nil,
		{WithHTPasswd(users)},
		{WithTokenAuth(users)},
		{WithTokenAuth(users), WithTLS()},
		{WithHTPasswd(users), WithTLS(), WithFilesystem(t.TempDir())},
	}
	regs := make([]*Registry, len(kinds))
	var wg sync.WaitGroup
	errs := make([]error, len(kinds))
	for i, opts := range kinds {
		wg.Go(func() {
			r, err := Start(context.Background(), opts...)
			if err != nil {
				errs[i] = err
				return
			}
			regs[i] = r
			_, errs[i] = r.SeedRandom(context.Background(), "t/app", "v1", RandSeed(uint64(i)))
		})
	}
	wg.Wait()
	for i, r := range regs {
		if r != nil {
			t.Cleanup(func() { r.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("registry %d: %v", i, errs[i])
		}
	}

	seen := map[v1.Hash]int{}
	for i, r := range regs {
		wg.Go(func() {
			img, err := pull(r, r.Ref("t/app", "v1"), &authn.Basic{Username: "u", Password: "p"})
			if err != nil {
				errs[i] = err
				return
			}
			d, err := img.Digest()
			errs[i] = err
			if err == nil {
				seenMu.Lock()
				seen[d] = i
				seenMu.Unlock()
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("pull from registry %d: %v", i, err)
		}
	}
	if len(seen) != len(regs) {
		t.Errorf("%d distinct images in %d registries", len(seen), len(regs))
	}
	for i, r := range regs {
		// Each pull is a ping, the manifest, one layer and the config, and
		// a token request under token auth; all of them went to r alone.
		n := len(r.Requests())
		if n < 4 || n > 5 {
			t.Errorf("registry %d saw %d requests: %+v", i, n, r.Requests())
		}
	}
}

var seenMu sync.Mutex
