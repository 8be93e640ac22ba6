package registry

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// SeedOption configures SeedRandom and SeedBlob.
type SeedOption func(*seedOptions)

type seedOptions struct {
	layers int
	size   int64
	seed   uint64
	seeded bool
}

// Layers sets the number of layers of a SeedRandom image (default 1).
func Layers(n int) SeedOption { return func(o *seedOptions) { o.layers = n } }

// LayerSize sets the size in bytes of the pseudo-random file in each layer
// of a SeedRandom image (default 1024). The layer blob is that plus the tar
// framing.
func LayerSize(n int64) SeedOption { return func(o *seedOptions) { o.size = n } }

// RandSeed makes the content deterministic: the same seed, layer count and
// size always give the same digests, in any registry. Without it each call
// picks a random seed.
func RandSeed(seed uint64) SeedOption {
	return func(o *seedOptions) { o.seed, o.seeded = seed, true }
}

func newSeedOptions(opts []SeedOption) (*seedOptions, error) {
	o := &seedOptions{layers: 1, size: 1024}
	for _, opt := range opts {
		opt(o)
	}
	if !o.seeded {
		var b [8]byte
		_, _ = rand.Read(b[:])
		o.seed = binary.LittleEndian.Uint64(b[:])
	}
	if o.layers < 0 || o.size < 0 {
		return nil, errors.New("registry: negative layer count or size")
	}
	return o, nil
}

// SeedRandom pushes an image of pseudo-random layers to repo:tag and returns
// it. The image is an OCI image for linux/GOARCH whose layers are
// uncompressed tars each holding one file; their content is generated on
// every read, never held in memory, so LayerSize(256<<20) is fine. Reading
// the returned image's layers regenerates the same bytes.
func (r *Registry) SeedRandom(ctx context.Context, repo, tag string, opts ...SeedOption) (v1.Image, error) {
	o, err := newSeedOptions(opts)
	if err != nil {
		return nil, err
	}
	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		RootFS:       v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, fmt.Errorf("registry: seed config: %w", err)
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	layers := make([]v1.Layer, o.layers)
	for i := range layers {
		layers[i] = &genLayer{
			seed:   layerSeed(o.seed, i),
			size:   o.size,
			tarred: true,
			name:   fmt.Sprintf("random-%d", i),
		}
	}
	if img, err = mutate.AppendLayers(img, layers...); err != nil {
		return nil, fmt.Errorf("registry: seed layers: %w", err)
	}
	if err := r.SeedImage(ctx, repo, tag, img); err != nil {
		return nil, err
	}
	return img, nil
}

// SeedImage pushes img to repo:tag.
func (r *Registry) SeedImage(ctx context.Context, repo, tag string, img v1.Image) error {
	ref, err := name.ParseReference(r.Ref(repo, tag))
	if err != nil {
		return fmt.Errorf("registry: seed reference: %w", err)
	}
	// Push the layers our way first (see pushLayer); remote.Write then finds
	// them present and pushes only the config and the manifest.
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("registry: seed %s: %w", ref, err)
	}
	for _, l := range layers {
		mt, err := l.MediaType()
		if err != nil {
			return fmt.Errorf("registry: seed %s: %w", ref, err)
		}
		if !mt.IsDistributable() {
			continue // foreign layers are not pushed; remote.Write skips them too
		}
		if err := r.pushLayer(ctx, ref.Context(), l); err != nil {
			return fmt.Errorf("registry: seed layer of %s: %w", ref, err)
		}
	}
	if err := remote.Write(ref, img, r.seedOptions(ctx)...); err != nil {
		return fmt.Errorf("registry: seed %s: %w", ref, err)
	}
	return nil
}

// SeedIndex pushes idx (and the images it refers to) to repo:tag.
func (r *Registry) SeedIndex(ctx context.Context, repo, tag string, idx v1.ImageIndex) error {
	ref, err := name.ParseReference(r.Ref(repo, tag))
	if err != nil {
		return fmt.Errorf("registry: seed reference: %w", err)
	}
	if err := remote.WriteIndex(ref, idx, r.seedOptions(ctx)...); err != nil {
		return fmt.Errorf("registry: seed %s: %w", ref, err)
	}
	return nil
}

// SeedBlob pushes a blob of size pseudo-random bytes (no tar framing, no
// manifest) to repo and returns its digest. Of opts only RandSeed applies; it
// makes the content deterministic (see RandomBlob). The bytes are streamed, so large
// sizes cost no memory here (the inmemory storage driver does keep the blob).
func (r *Registry) SeedBlob(ctx context.Context, repo string, size int64, opts ...SeedOption) (v1.Hash, error) {
	o, err := newSeedOptions(opts)
	if err != nil {
		return v1.Hash{}, err
	}
	if size < 0 {
		return v1.Hash{}, errors.New("registry: negative blob size")
	}
	l := &genLayer{seed: o.seed, size: size}
	d, err := l.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	rp, err := name.NewRepository(r.addr + "/" + repo)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("registry: seed repository: %w", err)
	}
	if err := r.pushLayer(ctx, rp, l); err != nil {
		return v1.Hash{}, fmt.Errorf("registry: seed blob to %s: %w", rp, err)
	}
	return d, nil
}

// RandomBlob returns, as a layer, the bytes SeedBlob(ctx, repo, size,
// RandSeed(seed)) pushes: its Digest, and Compressed to read them again (to
// compare with what a client received) without holding them in memory.
func RandomBlob(seed uint64, size int64) v1.Layer {
	return &genLayer{seed: seed, size: size}
}

// seedOptions authenticates as the internal seed user and talks to the
// handler in-process.
func (r *Registry) seedOptions(ctx context.Context) []remote.Option {
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuth(r.seedAuth()),
		remote.WithTransport(r.seed),
	}
}

func (r *Registry) seedAuth() authn.Authenticator {
	if r.users == nil {
		return authn.Anonymous
	}
	return &authn.Basic{Username: seedUser, Password: r.users.seedPassword()}
}
