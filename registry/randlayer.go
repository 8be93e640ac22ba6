package registry

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// genLayer is a layer whose content is generated from a seed on every read
// instead of held in memory, so a 256 MiB layer costs no memory to seed and
// can be re-read (to compare what a client pulled) at ChaCha8 speed.
//
// With tarred set it is an uncompressed tar holding one regular file of size
// pseudo-random bytes (a valid image layer, media type OCI tar: compressing
// random bytes gains nothing and costs time). Without it, it is just the
// bytes (a raw blob).
type genLayer struct {
	seed   uint64
	size   int64 // payload bytes
	tarred bool
	name   string // file name inside the tar

	once   sync.Once
	digest v1.Hash
	err    error
}

func (l *genLayer) header() []byte {
	if !l.tarred {
		return nil
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	// Fixed metadata so equal seeds give equal digests.
	_ = tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeReg,
		Name:     l.name,
		Mode:     0o644,
		Size:     l.size,
		ModTime:  time.Unix(0, 0),
	})
	// No Close: that would write the end-of-archive blocks, which stream
	// appends after the payload and its padding.
	return buf.Bytes()
}

// stream returns a fresh reader of the layer's bytes.
func (l *genLayer) stream() io.Reader {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], l.seed)
	copy(key[8:], "pullsecret/registry genLayer")
	payload := io.LimitReader(rand.NewChaCha8(key), l.size)
	if !l.tarred {
		return payload
	}
	pad := (512 - l.size%512) % 512
	return io.MultiReader(
		bytes.NewReader(l.header()),
		payload,
		bytes.NewReader(make([]byte, pad+1024)), // padding, then two zero blocks
	)
}

func (l *genLayer) totalSize() int64 {
	if !l.tarred {
		return l.size
	}
	return int64(len(l.header())) + (l.size+511)/512*512 + 1024
}

// Digest hashes the stream once and caches the result.
func (l *genLayer) Digest() (v1.Hash, error) {
	l.once.Do(func() {
		h := sha256.New()
		n, err := io.Copy(h, l.stream())
		if err != nil {
			l.err = fmt.Errorf("registry: hash generated layer: %w", err)
			return
		}
		if n != l.totalSize() {
			l.err = fmt.Errorf("registry: generated layer is %d bytes, want %d", n, l.totalSize())
			return
		}
		l.digest = v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
	})
	return l.digest, l.err
}

// DiffID is the digest: the layer is not compressed.
func (l *genLayer) DiffID() (v1.Hash, error) { return l.Digest() }

func (l *genLayer) Compressed() (io.ReadCloser, error) { return io.NopCloser(l.stream()), nil }

func (l *genLayer) Uncompressed() (io.ReadCloser, error) { return io.NopCloser(l.stream()), nil }

func (l *genLayer) Size() (int64, error) { return l.totalSize(), nil }

func (l *genLayer) MediaType() (types.MediaType, error) {
	if l.tarred {
		return types.OCIUncompressedLayer, nil
	}
	return "application/octet-stream", nil
}

// layerSeed derives the seed of layer i of an image seeded with seed, so the
// layers of one image differ from each other.
func layerSeed(seed uint64, i int) uint64 {
	return seed ^ (uint64(i)+1)*0x9e3779b97f4a7c15
}
