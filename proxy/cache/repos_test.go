package cache

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

// newFakeClock starts an hour ahead of the real clock, so times it gives
// are newer than any file's modification time.
func newFakeClock() *fakeClock { return &fakeClock{t: time.Now().Add(time.Hour)} }

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	f.t = f.t.Add(d)
	f.mu.Unlock()
}

func TestResolveTag(t *testing.T) {
	t.Parallel()
	d1 := digest.FromString("one")
	d2 := digest.FromString("two")
	errDenied := errors.New("upstream answered 401 Unauthorized")
	errDown := Unavailable(errors.New("dial tcp: connection refused"))

	type step struct {
		advance   time.Duration
		ttl       time.Duration
		answer    digest.Digest // "" = fail with err
		err       error
		want      digest.Digest
		stale     bool
		wantErr   error
		revalided bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"fresh entry is not revalidated", []step{
			{answer: d1, want: d1, revalided: true},
			{advance: 30 * time.Second, answer: d2, want: d1},
		}},
		{"expired entry is revalidated", []step{
			{answer: d1, want: d1, revalided: true},
			{advance: 61 * time.Second, answer: d2, want: d2, revalided: true},
			{advance: 10 * time.Second, answer: d1, want: d2},
		}},
		{"upstream down serves stale", []step{
			{answer: d1, want: d1, revalided: true},
			{advance: time.Hour, err: errDown, want: d1, stale: true, revalided: true},
			{advance: time.Second, err: Unavailable(errors.New("upstream answered 503")), want: d1, stale: true, revalided: true},
		}},
		{"401 never serves stale", []step{
			{answer: d1, want: d1, revalided: true},
			{advance: time.Hour, err: errDenied, wantErr: errDenied, revalided: true},
		}},
		{"nothing cached and upstream down", []step{
			{err: errDown, wantErr: ErrUpstreamUnavailable, revalided: true},
		}},
		{"negative ttl always revalidates", []step{
			{ttl: -1, answer: d1, want: d1, revalided: true},
			{ttl: -1, answer: d2, want: d2, revalided: true},
		}},
		{"custom ttl", []step{
			{ttl: time.Hour, answer: d1, want: d1, revalided: true},
			{ttl: time.Hour, advance: 59 * time.Minute, answer: d2, want: d1},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			counters := &Counters{}
			c, _ := newTestCache(t, WithClock(clk.Now), WithMetrics(counters))
			k := TagKey{Upstream: "Registry.Example.com:5000", Repo: "team/app", Tag: "v1"}
			stales := 0
			for i, s := range tt.steps {
				clk.Advance(s.advance)
				called := false
				got, stale, err := c.ResolveTag(context.Background(), k, s.ttl, func(context.Context) (Descriptor, error) {
					called = true
					if s.answer == "" {
						return Descriptor{}, s.err
					}
					return Descriptor{Digest: s.answer, MediaType: "application/vnd.oci.image.manifest.v1+json", Size: 42}, nil
				}, Project("acme"))
				if s.wantErr != nil {
					if !errors.Is(err, s.wantErr) {
						t.Fatalf("step %d: err %v, want %v", i, err, s.wantErr)
					}
				} else if err != nil || got.Digest != s.want || stale != s.stale {
					t.Fatalf("step %d: %s stale=%v err=%v; want %s stale=%v", i, got.Digest, stale, err, s.want, s.stale)
				}
				if called != s.revalided {
					t.Fatalf("step %d: revalidated=%v, want %v", i, called, s.revalided)
				}
				if s.stale {
					stales++
				}
			}
			if got := counters.Snapshot().StaleServes; got != int64(stales) {
				t.Errorf("stale serves %d, want %d", got, stales)
			}
		})
	}
}

func TestTagKeys(t *testing.T) {
	t.Parallel()
	c, _ := newTestCache(t)
	ctx := context.Background()
	d1, d2 := digest.FromString("a"), digest.FromString("b")
	// The same repository path on two registries never collides.
	a := TagKey{"ghcr.io", "acme/app", "v1"}
	b := TagKey{"registry.example.com:5000", "acme/app", "v1"}
	if err := c.SetTag(ctx, a, Descriptor{Digest: d1}); err != nil {
		t.Fatal(err)
	}
	if err := c.SetTag(ctx, b, Descriptor{Digest: d2}); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[TagKey]digest.Digest{a: d1, b: d2, {"GHCR.IO", "acme/app", "v1"}: d1} {
		got, err := c.Tag(ctx, k)
		if err != nil || got.Digest != want {
			t.Errorf("%s: %s %v, want %s", k, got.Digest, err, want)
		}
	}
	if _, err := c.Tag(ctx, TagKey{"ghcr.io", "acme/app", "v2"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing tag: %v", err)
	}
	// A tag is also a location of its manifest in its repository.
	if ok, _ := c.InRepo(ctx, d1, "ghcr.io", "acme/app"); !ok {
		t.Error("SetTag did not record the manifest's location")
	}
	if ok, _ := c.InRepo(ctx, d1, "registry.example.com:5000", "acme/app"); ok {
		t.Error("location leaked to another upstream")
	}
	if err := c.DeleteTag(ctx, a); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Tag(ctx, a); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted tag: %v", err)
	}

	for _, bad := range []TagKey{
		{"", "acme/app", "v1"},
		{"ghcr.io", "../etc", "v1"},
		{"ghcr.io", "acme/../x", "v1"},
		{"ghcr.io", "Acme/app", "v1"},
		{"ghcr.io", "acme/_tags", "v1"},
		{"ghcr.io", "acme/app", "a/b"},
		{"ghcr.io", "acme/app", ".."},
		{"ghcr.io", "acme/app", ""},
	} {
		if err := c.SetTag(ctx, bad, Descriptor{Digest: d1}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("SetTag(%q): %v, want ErrInvalidName", bad, err)
		}
	}
	if err := c.SetTag(ctx, a, Descriptor{Digest: "sha256:nothex"}); !errors.Is(err, ErrInvalidName) {
		t.Errorf("bad digest: %v", err)
	}
}

func TestEscapeHost(t *testing.T) {
	t.Parallel()
	seen := map[string]string{}
	for in, want := range map[string]string{
		"ghcr.io":                   "ghcr.io",
		"Registry.Example.com:5000": "registry.example.com_3a5000",
		"127.0.0.1:5000":            "127.0.0.1_3a5000",
		"[::1]:5000":                "_5b_3a_3a1_5d_3a5000",
		"..":                        "_2e.",
		"a_3a5000":                  "a_5f3a5000",
	} {
		got, err := escapeHost(in)
		if err != nil || got != want {
			t.Errorf("escapeHost(%q) = %q, %v; want %q", in, got, err, want)
		}
		if prev, dup := seen[got]; dup {
			t.Errorf("%q and %q escape alike", in, prev)
		}
		seen[got] = in
	}
}

// The content-location half of tenant isolation: cached content is served
// through another repository only once the upstream said it is there.
func TestLocations(t *testing.T) {
	t.Parallel()
	const up = "registry.example.com"
	layer := randomBytes(64<<10, 20)
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}`)
	ld, cd := digest.FromBytes(layer), digest.FromBytes(config)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",` +
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":` + itoa(len(config)) + `,"digest":"` + cd.String() + `"},` +
		`"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":` + itoa(len(layer)) + `,"digest":"` + ld.String() + `"}]}`)
	md := digest.FromBytes(manifest)

	c, _ := newTestCache(t)
	ctx := context.Background()
	// Project A pulls through team/a: manifest then layer.
	m, err := c.Manifest(ctx, md, manifestFetch(manifest, "application/vnd.oci.image.manifest.v1+json", nil), In(up, "team/a", nil))
	if err != nil || m.Source != SourceUpstream {
		t.Fatalf("manifest: %v", err)
	}
	waitFor(t, "manifest commit", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.mfills[key{KindManifest, md}] == nil // stored and located
	})
	// The manifest's references are located in team/a before being fetched.
	for _, d := range []digest.Digest{md, ld, cd} {
		if ok, err := c.InRepo(ctx, d, up, "team/a"); !ok || err != nil {
			t.Errorf("%s not located in team/a: %v", d, err)
		}
	}
	r, err := c.Blob(ctx, ld, bytesFetch(layer, nil, nil), In(up, "team/a", nil))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, r)
	_ = r.Close()
	waitFor(t, "layer commit", func() bool { return committed(c, KindBlob, ld) })

	errNo := errors.New("upstream answered 404 BLOB_UNKNOWN")
	var checks atomic.Int32
	check := func(err error) CheckFunc {
		return func(context.Context) error { checks.Add(1); return err }
	}
	tests := []struct {
		name    string
		up      string
		repo    string
		check   CheckFunc
		wantErr error
		checks  int32
	}{
		{"same repository, no check", up, "team/a", nil, nil, 0},
		{"other repository, no check given", up, "team/b", nil, ErrNotInRepository, 0},
		{"other repository, upstream says no", up, "team/b", check(errNo), errNo, 1},
		{"other upstream, same path", "other.example.com", "team/a", check(errNo), errNo, 1},
		{"other repository, upstream says yes", up, "team/c", check(nil), nil, 1},
		{"then known without a check", up, "team/c", check(errNo), nil, 0},
	}
	for _, tt := range tests { // sequential: later cases build on earlier ones
		checks.Store(0)
		r, err := c.Blob(ctx, ld, nil, In(tt.up, tt.repo, tt.check))
		if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
			t.Errorf("%s: blob err %v, want %v", tt.name, err, tt.wantErr)
		}
		if r != nil {
			_ = r.Close()
		}
		if n := checks.Load(); n != tt.checks {
			t.Errorf("%s: %d checks, want %d", tt.name, n, tt.checks)
		}
		// Stat (a HEAD) reveals no more than a GET.
		checks.Store(0)
		if _, err := c.Stat(ctx, KindBlob, ld, In(tt.up, tt.repo, tt.check)); !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
			t.Errorf("%s: stat err %v, want %v", tt.name, err, tt.wantErr)
		}
	}
	// Manifests by digest follow the same rule.
	if _, err := c.Manifest(ctx, md, nil, In(up, "team/b", nil)); !errors.Is(err, ErrNotInRepository) {
		t.Errorf("manifest through team/b: %v", err)
	}
	if _, err := c.Manifest(ctx, md, nil, In(up, "team/a", nil)); err != nil {
		t.Errorf("manifest through team/a: %v", err)
	}
}

// Joining a fill in flight from another repository needs the check too.
func TestLocationOfFillInFlight(t *testing.T) {
	t.Parallel()
	content := randomBytes(1<<20, 21)
	d := digest.FromBytes(content)
	c, _ := newTestCache(t)
	ctx := context.Background()
	gh := newGateHolder(0)
	var calls fetchCounter
	first, err := c.Blob(ctx, d, bytesFetch(content, &calls, gh.wrap), In("up.example", "team/a", nil))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := c.Blob(ctx, d, bytesFetch(content, &calls, nil), In("up.example", "team/b", func(context.Context) error {
		return errors.New("upstream answered 403")
	})); err == nil {
		t.Fatal("joined a fill from another repository without proof")
	}
	r, err := c.Blob(ctx, d, bytesFetch(content, &calls, nil), In("up.example", "team/b", func(context.Context) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Source() != SourceCoalesced {
		t.Fatalf("source %v", r.Source())
	}
	gh.gate(t).Open(-1)
	for _, rd := range []*Reader{first, r} {
		if got, _, err := readAllDigest(rd); err != nil || got != d {
			t.Fatalf("%v %s", err, got)
		}
	}
	if calls.n.Load() != 1 {
		t.Fatalf("fetches %d", calls.n.Load())
	}
}

func manifestFetch(content []byte, mediaType string, calls *fetchCounter) FetchFunc {
	return func(context.Context) (Fetched, error) {
		if calls != nil {
			calls.n.Add(1)
		}
		return Fetched{Body: io.NopCloser(bytes.NewReader(content)), Size: int64(len(content)), MediaType: mediaType}, nil
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }
