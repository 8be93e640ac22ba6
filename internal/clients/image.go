package clients

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// BusyboxPath is where Debian's busybox-static puts its static binary.
const BusyboxPath = "/bin/busybox"

// BusyboxApplets are linked to /bin/busybox in the test image.
var BusyboxApplets = []string{
	"sh", "ash", "env", "cat", "echo", "printf", "ls", "sleep", "true", "false", "test", "[",
	"id", "whoami", "hostname", "uname", "pwd", "grep", "sed", "awk", "head", "tail", "wc",
	"sort", "tr", "cut", "mkdir", "rm", "cp", "mv", "ln", "touch", "stat", "find", "xargs",
	"ps", "kill", "date", "sha256sum", "base64", "wget", "nc", "mount", "df", "du",
}

// BusyboxImage builds a small runnable image (one layer, ~1 MiB compressed)
// without any registry: the host's static busybox at /bin/busybox plus
// /bin/<applet> symlinks for BusyboxApplets, /tmp, and a config for the host
// architecture with Env PATH=/bin and Cmd ["sh"] (like library/busybox, no
// entrypoint), so `docker run IMAGE sh -c 'env'` works. The build is
// deterministic: the same busybox binary gives the same digest.
func BusyboxImage() (v1.Image, error) { return BusyboxImageFrom(BusyboxPath) }

// BusyboxImageFrom is BusyboxImage with another static busybox binary.
func BusyboxImageFrom(busyboxPath string) (v1.Image, error) {
	bin, err := os.ReadFile(busyboxPath)
	if err != nil {
		return nil, fmt.Errorf("busybox image: %w (apt-get install busybox-static)", err)
	}
	if err := checkStatic(busyboxPath); err != nil {
		return nil, err
	}
	layerTar, err := busyboxTar(bin)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Env = []string{"PATH=/bin"}
	cf.Config.Cmd = []string{"sh"}
	cf.Config.Entrypoint = nil
	cf.Config.WorkingDir = "/"
	return mutate.ConfigFile(img, cf)
}

var epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("busybox image: %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox image: %s is dynamically linked; it must be static (apt-get install busybox-static)", path)
		}
	}
	return nil
}

func busyboxTar(bin []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdrs := []*tar.Header{
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777},
		{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(bin))},
	}
	for _, a := range BusyboxApplets {
		hdrs = append(hdrs, &tar.Header{Name: "bin/" + a, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777})
	}
	for _, h := range hdrs {
		h.ModTime = epoch
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(bin); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Push writes img to ref (plain HTTP allowed, as for a test registry on
// 127.0.0.1) and returns its digest. Pass remote.WithAuth for a registry that
// wants credentials.
func Push(ctx context.Context, ref string, img v1.Image, opts ...remote.Option) (v1.Hash, error) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return v1.Hash{}, err
	}
	if err := remote.Write(r, img, append([]remote.Option{remote.WithContext(ctx)}, opts...)...); err != nil {
		return v1.Hash{}, fmt.Errorf("push %s: %w", ref, err)
	}
	return img.Digest()
}
