package cache

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// fillBlob caches content as a blob and waits for the commit.
func fillBlob(t testing.TB, c *Cache, content []byte, opts ...RequestOption) digest.Digest {
	t.Helper()
	d := digest.FromBytes(content)
	r, err := c.Blob(context.Background(), d, bytesFetch(content, nil, nil), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatal(err)
	}
	_ = r.Close()
	waitFor(t, "commit", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.fills[key{KindBlob, d}] == nil && committed(c, KindBlob, d)
	})
	return d
}

func hit(t testing.TB, c *Cache, d digest.Digest) {
	t.Helper()
	r, err := c.Blob(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = r.Close()
}

func TestGC(t *testing.T) {
	t.Parallel()
	const size = 10 << 10
	tests := []struct {
		name     string
		generic  bool
		prepare  func(t *testing.T, s *gcSetup) Policy
		deleted  []int // indexes into b; 4 = the manifest
		inUse    int
		refd     int
		tagsGone int
	}{
		{"max size, least recently used first", false, func(t *testing.T, s *gcSetup) Policy {
			return Policy{MaxSize: 2*size + 500} // the manifest is small
		}, []int{0, 1}, 0, 0, 0},
		{"a hit makes an entry recent", false, func(t *testing.T, s *gcSetup) Policy {
			s.clk.Advance(time.Minute)
			hit(t, s.c, s.b[0])
			return Policy{MaxSize: 3*size + 500}
		}, []int{1}, 0, 0, 0},
		{"older than", false, func(t *testing.T, s *gcSetup) Policy {
			return Policy{OlderThan: s.clk.Now().Sub(s.at[1]) + 30*time.Second}
		}, []int{0}, 0, 0, 0},
		{"an open reader protects", false, func(t *testing.T, s *gcSetup) Policy {
			var err error
			if s.open, err = s.c.Blob(context.Background(), s.b[0], nil); err != nil {
				t.Fatal(err)
			}
			return Policy{MaxSize: 1} // everything it may
		}, []int{1, 2, 3, 4}, 1, 0, 1},
		{"a manifest that stays protects its blobs", false, func(t *testing.T, s *gcSetup) Policy {
			s.clk.Advance(time.Hour)
			hit(t, s.c, s.b[0])
			if _, err := s.c.Manifest(context.Background(), s.m, nil); err != nil {
				t.Fatal(err)
			}
			return Policy{OlderThan: time.Minute}
		}, []int{1}, 0, 2, 0},
		{"everything old goes, images too", false, func(t *testing.T, s *gcSetup) Policy {
			s.clk.Advance(time.Hour)
			return Policy{OlderThan: time.Minute}
		}, []int{0, 1, 2, 3, 4}, 0, 0, 1},
		{"generic driver", true, func(t *testing.T, s *gcSetup) Policy {
			s.clk.Advance(time.Hour)
			return Policy{OlderThan: time.Minute}
		}, []int{0, 1, 2, 3, 4}, 0, 0, 1},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := &gcSetup{clk: newFakeClock()}
			var root string
			if tt.generic {
				s.c = newInmemoryCache(t, WithClock(s.clk.Now))
			} else {
				s.c, root = newTestCache(t, WithClock(s.clk.Now))
			}
			ctx := context.Background()
			for j := range 4 {
				s.at = append(s.at, s.clk.Now())
				s.b = append(s.b, fillBlob(t, s.c, randomBytes(size, uint64(100*i+j))))
				s.clk.Advance(time.Minute)
			}
			// An image whose config and layer are b[2] and b[3], committed
			// last (most recently used).
			man := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{"digest":"` + s.b[2].String() +
				`","size":10240},"layers":[{"digest":"` + s.b[3].String() + `","size":10240}]}`)
			desc, err := s.c.PutManifest(ctx, man, ociManifest, In("up.example", "team/app", nil))
			if err != nil {
				t.Fatal(err)
			}
			s.m = desc.Digest
			s.tag = TagKey{"up.example", "team/app", "v1"}
			if err := s.c.SetTag(ctx, s.tag, Descriptor{Digest: s.m}); err != nil {
				t.Fatal(err)
			}
			s.clk.Advance(time.Minute)

			p := tt.prepare(t, s)
			res, err := s.c.GC(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			all := append(slices.Clone(s.b), s.m)
			for j, d := range all {
				kind := KindBlob
				if j == 4 {
					kind = KindManifest
				}
				gone := !committed(s.c, kind, d)
				if want := slices.Contains(tt.deleted, j); gone != want {
					t.Errorf("entry %d: deleted=%v, want %v", j, gone, want)
				}
			}
			if res.Deleted != len(tt.deleted) || res.SkippedInUse != tt.inUse || res.SkippedReferenced != tt.refd || res.TagsDeleted != tt.tagsGone {
				t.Errorf("result %+v; want deleted %d, in use %d, referenced %d, tags %d", res, len(tt.deleted), tt.inUse, tt.refd, tt.tagsGone)
			}
			if root != "" {
				if _, err := os.Stat(filepath.Join(root, "_trash")); err == nil {
					if ents, _ := os.ReadDir(filepath.Join(root, "_trash")); len(ents) != 0 {
						t.Errorf("trash left: %v", ents)
					}
				}
			}
			if tt.tagsGone > 0 {
				if _, err := s.c.Tag(ctx, s.tag); !errors.Is(err, ErrNotFound) {
					t.Errorf("tag of a deleted manifest kept: %v", err)
				}
				if ok, _ := s.c.InRepo(ctx, s.m, "up.example", "team/app"); ok {
					t.Error("location of a deleted manifest kept")
				}
			}
			if s.open != nil {
				// The protected reader still reads; once closed, GC takes it.
				if got, _, err := readAllDigest(s.open); err != nil || got != s.b[0] {
					t.Fatalf("protected reader: %v", err)
				}
				_ = s.open.Close()
				res, err := s.c.GC(ctx, p)
				if err != nil || res.Deleted != 1 || committed(s.c, KindBlob, s.b[0]) {
					t.Fatalf("after close: %+v %v", res, err)
				}
			}
			// Deleted content is fetched again on demand.
			if len(tt.deleted) > 0 && tt.deleted[0] < 4 {
				if _, err := s.c.Blob(ctx, s.b[tt.deleted[0]], nil); !errors.Is(err, ErrNotFound) {
					t.Errorf("deleted blob: %v", err)
				}
			}
		})
	}
}

// gcSetup is the cache of one TestGC case: four blobs committed a minute
// apart (b[0] first), then an image manifest m referencing b[2] and b[3],
// and a tag of it.
type gcSetup struct {
	c    *Cache
	clk  *fakeClock
	b    []digest.Digest
	at   []time.Time // commit times of b
	m    digest.Digest
	tag  TagKey
	open *Reader
}

// GC leaves a fill in flight, and its readers, alone; and removes entry
// directories left without data by an interrupted deletion.
func TestGCInFlightAndOrphans(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	c, root := newTestCache(t, WithClock(clk.Now))
	ctx := context.Background()
	content := randomBytes(1<<20, 30)
	d := digest.FromBytes(content)
	gh := newGateHolder(1 << 19)
	r, err := c.Blob(ctx, d, bytesFetch(content, nil, gh.wrap))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	gh.gate(t).Open(-1)
	waitCommitted(t, c, KindBlob, d)
	clk.Advance(24 * time.Hour)
	res, err := c.GC(ctx, Policy{OlderThan: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted != 0 || res.SkippedInUse != 1 {
		t.Fatalf("GC with a reader of a fill open: %+v", res)
	}
	if got, _, err := readAllDigest(r); err != nil || got != d {
		t.Fatalf("reader: %v", err)
	}

	orphan := filepath.Join(root, "blobs", "sha256", "ab", "ab"+d.Encoded()[2:])
	if err := os.MkdirAll(orphan, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(orphan, accessedName), []byte(clk.Now().Format(time.RFC3339Nano)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GC(ctx, Policy{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("orphan entry kept: %v", err)
	}
}

func TestStats(t *testing.T) {
	t.Parallel()
	c, _ := newTestCache(t)
	ctx := context.Background()
	fillBlob(t, c, randomBytes(1000, 40))
	fillBlob(t, c, randomBytes(2000, 41))
	man := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `"}`)
	desc, err := c.PutManifest(ctx, man, ociManifest)
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range []string{"v1", "latest"} {
		if err := c.SetTag(ctx, TagKey{"ghcr.io", "a/b", tag}, desc); err != nil {
			t.Fatal(err)
		}
	}
	s, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := Stats{Blobs: KindStats{2, 3000}, Manifests: KindStats{1, int64(len(man))}, Tags: 2}
	if s != want || s.Count() != 3 || s.Bytes() != 3000+int64(len(man)) {
		t.Fatalf("stats %+v, want %+v", s, want)
	}
}

func TestRunGC(t *testing.T) {
	t.Parallel()
	clk := newFakeClock()
	c, _ := newTestCache(t, WithClock(clk.Now))
	d := fillBlob(t, c, randomBytes(1000, 50))
	clk.Advance(time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.RunGC(ctx, 10*time.Millisecond, Policy{OlderThan: time.Minute}) }()
	waitFor(t, "background GC", func() bool { return !committed(c, KindBlob, d) })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("RunGC: %v", err)
	}
}

func TestPrometheusMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	pm, err := NewPrometheus(reg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewPrometheus(reg); err == nil {
		t.Error("registered twice on one registry")
	}
	c, _ := newTestCache(t, WithMetrics(pm))
	content := randomBytes(5000, 60)
	d := fillBlob(t, c, content, In("ghcr.io", "acme/app", nil), Project("acme"))
	r, err := c.Blob(context.Background(), d, nil, In("ghcr.io", "acme/app", nil), Project("acme"))
	if err != nil {
		t.Fatal(err)
	}
	_ = r.Close()
	_, _ = c.Blob(context.Background(), digest.FromString("x"), bytesFetch([]byte("y"), nil, nil))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "," + l.GetName() + "=" + l.GetValue()
			}
			got[name] = m.GetCounter().GetValue()
		}
	}
	for name, want := range map[string]float64{
		"pullsecret_cache_misses_total,kind=blob,project=acme,upstream=ghcr.io":         1,
		"pullsecret_cache_hits_total,kind=blob,project=acme,upstream=ghcr.io":           1,
		"pullsecret_cache_upstream_bytes_total,kind=blob,project=acme,upstream=ghcr.io": 5000,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v (all: %v)", name, got[name], want, got)
		}
	}
	waitFor(t, "failure metric", func() bool {
		mfs, _ := reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() == "pullsecret_cache_fill_failures_total" {
				return true
			}
		}
		return false
	})
}

// countingLeases records who won each Acquire of the GC lease.
type countingLeases struct {
	Leases
	mu   sync.Mutex
	wins map[string]int
}

func (l *countingLeases) Acquire(ctx context.Context, key, holder, addr string, ttl time.Duration) (Lease, bool, error) {
	cur, mine, err := l.Leases.Acquire(ctx, key, holder, addr, ttl)
	if key == gcLeaseKey && mine {
		l.mu.Lock()
		l.wins[holder]++
		l.mu.Unlock()
	}
	return cur, mine, err
}

// Two replicas with the background GC on: one of them runs it, each
// interval, not both; when it stops, the other takes over.
func TestRunGCTakesTurnsInACluster(t *testing.T) {
	t.Parallel()
	leases := &countingLeases{Leases: NewMemoryLeases(nil), wins: map[string]int{}}
	replica := func(self string) *Cache {
		c, _ := newTestCache(t, WithCluster(Cluster{Leases: leases, Self: self, Addr: "http://" + self}))
		return c
	}
	a, b := replica("a"), replica("b")
	// Wide enough that a loaded machine's timer jitter stays under half of it.
	const interval = 200 * time.Millisecond
	ctxA, stopA := context.WithCancel(context.Background())
	doneA := make(chan error, 1)
	go func() { doneA <- a.RunGC(ctxA, interval, Policy{OlderThan: time.Hour}) }()
	waitFor(t, "a's first run", func() bool { leases.mu.Lock(); defer leases.mu.Unlock(); return leases.wins["a"] > 0 })
	// b's ticks fall half an interval after a's.
	time.Sleep(interval / 2)
	ctxB, stopB := context.WithCancel(context.Background())
	defer stopB()
	go b.RunGC(ctxB, interval, Policy{OlderThan: time.Hour})
	time.Sleep(6 * interval)
	leases.mu.Lock()
	wa, wb := leases.wins["a"], leases.wins["b"]
	leases.mu.Unlock()
	if wa < 3 || wb != 0 {
		t.Fatalf("runs while a lives: a %d, b %d; want a about 6, b none", wa, wb)
	}
	stopA()
	<-doneA
	waitFor(t, "b taking over", func() bool { leases.mu.Lock(); defer leases.mu.Unlock(); return leases.wins["b"] > 0 })
}
