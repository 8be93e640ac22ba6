package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
)

const ociManifest = "application/vnd.oci.image.manifest.v1+json"

func TestManifestCoalesced(t *testing.T) {
	t.Parallel()
	content := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `","config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"` + digest.FromString("{}").String() + `"},"layers":[]}`)
	d := digest.FromBytes(content)
	counters := &Counters{}
	c, _ := newTestCache(t, WithMetrics(counters))
	var calls fetchCounter
	release := make(chan struct{})
	fetch := func(ctx context.Context) (Fetched, error) {
		calls.n.Add(1)
		<-release
		return Fetched{Body: io.NopCloser(bytes.NewReader(content)), Size: int64(len(content)), MediaType: ociManifest}, nil
	}
	const n = 20
	var wg sync.WaitGroup
	var mu sync.Mutex
	sources := map[Source]int{}
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, err := c.Manifest(context.Background(), d, fetch)
			if err != nil || !bytes.Equal(m.Content, content) || m.MediaType != ociManifest || m.Digest != d {
				t.Errorf("manifest: %v", err)
				return
			}
			mu.Lock()
			sources[m.Source]++
			mu.Unlock()
		}()
	}
	waitFor(t, "joiners", func() bool { return calls.n.Load() == 1 })
	close(release)
	wg.Wait()
	if calls.n.Load() != 1 {
		t.Errorf("fetch called %d times", calls.n.Load())
	}
	if sources[SourceUpstream] != 1 || sources[SourceUpstream]+sources[SourceCoalesced]+sources[SourceCache] != n {
		t.Errorf("sources %v", sources)
	}
	waitCommitted(t, c, KindManifest, d)
	m, err := c.Manifest(context.Background(), d, nil)
	if err != nil || m.Source != SourceCache || m.MediaType != ociManifest {
		t.Fatalf("hit: %+v %v", m, err)
	}
	if counters.Snapshot().Hits[KindManifest] < 1 {
		t.Error("no hit counted")
	}
}

func TestManifestFailures(t *testing.T) {
	t.Parallel()
	content := []byte(`{"schemaVersion":2,"mediaType":"` + ociManifest + `"}`)
	d := digest.FromBytes(content)
	big := bytes.Repeat([]byte(" "), 5<<20)
	tests := []struct {
		name  string
		fetch FetchFunc
		is    error
	}{
		{"digest mismatch", manifestFetch(append(bytes.Clone(content), ' '), ociManifest, nil), ErrDigestMismatch},
		{"announced too large", manifestFetch(big, ociManifest, nil), ErrManifestTooLarge},
		{"too large, size unknown", func(context.Context) (Fetched, error) {
			return Fetched{Body: io.NopCloser(bytes.NewReader(big)), Size: -1}, nil
		}, ErrManifestTooLarge},
		{"short", func(context.Context) (Fetched, error) {
			return Fetched{Body: io.NopCloser(bytes.NewReader(content[:5])), Size: int64(len(content))}, nil
		}, ErrSizeMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, _ := newTestCache(t)
			_, err := c.Manifest(context.Background(), d, tt.fetch)
			var fe *FillError
			if !errors.As(err, &fe) || !errors.Is(err, tt.is) {
				t.Fatalf("err %v, want a FillError wrapping %v", err, tt.is)
			}
			if committed(c, KindManifest, d) {
				t.Fatal("cached")
			}
			// The next request fetches again, and succeeds.
			m, err := c.Manifest(context.Background(), d, manifestFetch(content, ociManifest, nil))
			if err != nil || !bytes.Equal(m.Content, content) {
				t.Fatalf("retry: %v", err)
			}
		})
	}
}

// A manifest is hashed again when read back: tampered storage is a miss.
func TestManifestVerifiedOnRead(t *testing.T) {
	t.Parallel()
	c, root := newTestCache(t)
	ctx := context.Background()
	content := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
	desc, err := c.PutManifest(ctx, content, "")
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != digest.FromBytes(content) || desc.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("descriptor %+v", desc)
	}
	if m, err := c.Manifest(ctx, desc.Digest, nil); err != nil || m.Source != SourceCache {
		t.Fatalf("hit: %v", err)
	}
	p := filepath.Join(root, filepath.FromSlash(dataPath(key{KindManifest, desc.Digest})))
	if err := os.WriteFile(p, []byte(`{"evil":true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Manifest(ctx, desc.Digest, nil); err == nil {
		t.Fatal("served tampered content")
	}
	var calls fetchCounter
	m, err := c.Manifest(ctx, desc.Digest, manifestFetch(content, "", &calls))
	if err != nil || !bytes.Equal(m.Content, content) || calls.n.Load() != 1 {
		t.Fatalf("refetch: %v, %d calls", err, calls.n.Load())
	}
}

func TestManifestRefs(t *testing.T) {
	t.Parallel()
	a, b, cfg := digest.FromString("a"), digest.FromString("b"), digest.FromString("cfg")
	tests := []struct {
		name, mt, content string
		want              []digest.Digest
	}{
		{"oci image", ociManifest, `{"schemaVersion":2,"config":{"digest":"` + cfg.String() + `"},"layers":[{"digest":"` + a.String() + `"},{"digest":"` + b.String() + `"}]}`, []digest.Digest{cfg, a, b}},
		{"docker image, sniffed", "", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"` + cfg.String() + `"},"layers":[{"digest":"` + a.String() + `"}]}`, []digest.Digest{cfg, a}},
		{"oci index", "application/vnd.oci.image.index.v1+json", `{"schemaVersion":2,"manifests":[{"digest":"` + a.String() + `"}],"subject":{"digest":"` + b.String() + `"}}`, []digest.Digest{a, b}},
		{"docker list, sniffed", "", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"digest":"` + b.String() + `"}]}`, []digest.Digest{b}},
		{"schema 1", "", `{"schemaVersion":1,"fsLayers":[{"blobSum":"` + a.String() + `"}]}`, []digest.Digest{a}},
		{"referrer", ociManifest, `{"schemaVersion":2,"config":{"digest":"` + cfg.String() + `"},"layers":[],"subject":{"digest":"` + a.String() + `"}}`, []digest.Digest{cfg, a}},
		{"garbage", ociManifest, `not json`, nil},
	}
	for _, tt := range tests {
		got := manifestRefs(tt.mt, []byte(tt.content))
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
}
