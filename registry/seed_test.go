package registry

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func TestSeedRandom(t *testing.T) {
	t.Parallel()
	alice := &authn.Basic{Username: "alice", Password: "alice-pw"}
	for _, c := range []struct {
		name   string
		opts   []Option
		auth   authn.Authenticator
		layers int
		size   int64
	}{
		{"defaults", nil, nil, 0, 0},
		{"three layers", nil, nil, 3, 4096},
		{"odd size", nil, nil, 1, 1000},
		{"empty layer", nil, nil, 1, 0},
		{"htpasswd", []Option{WithHTPasswd(testUsers)}, alice, 2, 100},
		{"token over TLS", []Option{WithTokenAuth(testUsers), WithTLS()}, alice, 2, 100},
		{"filesystem", []Option{WithFilesystem(t.TempDir())}, nil, 2, 100},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := start(t, c.opts...)
			var so []SeedOption
			wantLayers, wantSize := 1, int64(1024)
			if c.layers != 0 {
				so = append(so, Layers(c.layers), LayerSize(c.size))
				wantLayers, wantSize = c.layers, c.size
			}
			img, err := r.SeedRandom(t.Context(), "t/app", "v1", so...)
			if err != nil {
				t.Fatal(err)
			}
			if n := len(r.Requests()); n != 0 {
				t.Errorf("seeding left %d requests in the log", n)
			}
			got, err := pull(r, r.Ref("t/app", "v1"), c.auth)
			if err != nil {
				t.Fatal(err)
			}
			if digestOf(t, got) != digestOf(t, img) {
				t.Error("pulled digest differs from seeded")
			}
			// And by digest.
			if _, err := pull(r, r.Ref("t/app", digestOf(t, img).String()), c.auth); err != nil {
				t.Errorf("pull by digest: %v", err)
			}

			m, err := got.Manifest()
			if err != nil {
				t.Fatal(err)
			}
			if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON {
				t.Errorf("media types %s, %s", m.MediaType, m.Config.MediaType)
			}
			if len(m.Layers) != wantLayers {
				t.Fatalf("%d layers, want %d", len(m.Layers), wantLayers)
			}
			layers, _ := got.Layers()
			for i, l := range layers {
				checkTarLayer(t, l, fmt.Sprintf("random-%d", i), wantSize)
			}
			cf, err := got.ConfigFile()
			if err != nil || cf.OS != "linux" || len(cf.RootFS.DiffIDs) != wantLayers {
				t.Errorf("config %+v, %v", cf, err)
			}
		})
	}
}

// checkTarLayer reads a pulled layer as a tar holding one file.
func checkTarLayer(t *testing.T, l v1.Layer, wantName string, wantSize int64) {
	t.Helper()
	mt, _ := l.MediaType()
	if mt != types.OCIUncompressedLayer {
		t.Errorf("layer media type %s", mt)
	}
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	h, err := tr.Next()
	if err != nil {
		t.Fatalf("tar: %v", err)
	}
	n, err := io.Copy(io.Discard, tr)
	if err != nil || h.Name != wantName || h.Size != wantSize || n != wantSize {
		t.Errorf("tar entry %q size %d (read %d, %v), want %q size %d", h.Name, h.Size, n, err, wantName, wantSize)
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Errorf("more than one tar entry: %v", err)
	}
}

func TestSeedDeterminism(t *testing.T) {
	t.Parallel()
	a, b := start(t), start(t, WithHTPasswd(testUsers))
	seed := func(r *Registry, tag string, opts ...SeedOption) v1.Hash {
		t.Helper()
		img, err := r.SeedRandom(t.Context(), "t/app", tag, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return digestOf(t, img)
	}
	same1 := seed(a, "s42", RandSeed(42), Layers(2))
	same2 := seed(b, "s42", RandSeed(42), Layers(2))
	if same1 != same2 {
		t.Error("same seed, different digests")
	}
	if seed(a, "s43", RandSeed(43), Layers(2)) == same1 {
		t.Error("different seeds, same digest")
	}
	if seed(a, "r1") == seed(a, "r2") {
		t.Error("two unseeded images are equal")
	}
	// Layers of one image differ from each other.
	img, err := a.SeedRandom(t.Context(), "t/app", "multi", Layers(3), RandSeed(1))
	if err != nil {
		t.Fatal(err)
	}
	ls, _ := img.Layers()
	seen := map[v1.Hash]bool{}
	for _, l := range ls {
		d, _ := l.Digest()
		seen[d] = true
	}
	if len(seen) != 3 {
		t.Errorf("%d distinct layers of 3", len(seen))
	}
}

func TestSeedBlob(t *testing.T) {
	t.Parallel()
	big := int64(64 << 20)
	if raceEnabled {
		big = 16 << 20
	}
	for _, c := range []struct {
		name string
		size int64
		opts []Option
	}{
		{"small", 1, nil},
		{"empty", 0, nil},
		{"big", big, nil},
		{"8MiB filesystem token", 8 << 20, []Option{WithFilesystem(t.TempDir()), WithTokenAuth(testUsers)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := start(t, c.opts...)
			began := time.Now()
			d, err := r.SeedBlob(t.Context(), "t/big", c.size, RandSeed(7))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("seeded %d bytes in %v", c.size, time.Since(began))
			want, _ := RandomBlob(7, c.size).Digest()
			if d != want {
				t.Errorf("SeedBlob digest %s, RandomBlob %s", d, want)
			}

			// Fetch it with the registry's own client.
			repo, _ := name.NewRepository(r.Addr() + "/t/big")
			var auth authn.Authenticator = authn.Anonymous
			if c.opts != nil {
				auth = &authn.Basic{Username: "alice", Password: "alice-pw"}
			}
			l, err := remote.Layer(repo.Digest(d.String()), remote.WithAuth(auth), remote.WithTransport(r.Transport()))
			if err != nil {
				t.Fatal(err)
			}
			rc, err := l.Compressed()
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			n, err := io.Copy(h, rc)
			rc.Close()
			if err != nil || n != c.size {
				t.Fatalf("read %d bytes, err %v", n, err)
			}
			if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != d.String() {
				t.Errorf("content hashes to %s, want %s", got, d)
			}
			if c.size > 0 && r.BlobFetches(d.String()) != 1 {
				t.Errorf("BlobFetches = %d, want 1", r.BlobFetches(d.String()))
			}
		})
	}
}

func TestSeedImageAndIndex(t *testing.T) {
	t.Parallel()
	r := start(t, WithTokenAuth(testUsers))
	auth := remote.WithAuth(&authn.Basic{Username: "bob", Password: "bob-pw"})

	img, err := random.Image(512, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SeedImage(t.Context(), "t/img", "v1", img); err != nil {
		t.Fatal(err)
	}
	got, err := pull(r, r.Ref("t/img", "v1"), &authn.Basic{Username: "bob", Password: "bob-pw"})
	if err != nil {
		t.Fatal(err)
	}
	if digestOf(t, got) != digestOf(t, img) {
		t.Error("image digest differs")
	}

	idx, err := random.Index(256, 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SeedIndex(t.Context(), "t/idx", "v1", idx); err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(r.Ref("t/idx", "v1"))
	gotIdx, err := remote.Index(ref, auth, remote.WithTransport(r.Transport()))
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := gotIdx.Digest()
	d2, _ := idx.Digest()
	if d1 != d2 {
		t.Error("index digest differs")
	}
	im, _ := gotIdx.IndexManifest()
	for _, desc := range im.Manifests {
		if _, err := pull(r, r.Ref("t/idx", desc.Digest.String()), &authn.Basic{Username: "bob", Password: "bob-pw"}); err != nil {
			t.Errorf("child %s: %v", desc.Digest, err)
		}
	}

	// Seeding a tag that is a digest-shaped string of the wrong image fails
	// with a wrapped error that names the reference.
	bad := "sha256:" + fmt.Sprintf("%064d", 0)
	if err := r.SeedImage(t.Context(), "t/img", bad, img); err == nil {
		t.Error("pushing under a wrong digest succeeded")
	}
	if resp, err := r.Client().Get(r.URL() + "/v2/t/img/manifests/v1"); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("registry lets anonymous clients in: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
}

func TestSeedOptionsRejected(t *testing.T) {
	t.Parallel()
	r := start(t)
	if _, err := r.SeedRandom(t.Context(), "t/app", "v1", Layers(-1)); err == nil {
		t.Error("negative layer count accepted")
	}
	if _, err := r.SeedBlob(t.Context(), "t/app", -1); err == nil {
		t.Error("negative blob size accepted")
	}
	if _, err := r.SeedRandom(t.Context(), "T/Upper", "v1"); err == nil {
		t.Error("invalid repository name accepted")
	}
}
