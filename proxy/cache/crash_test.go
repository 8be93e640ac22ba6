package cache

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"
)

// The crash tests re-execute the test binary as a child that opens a cache,
// gets to a chosen point of a fill and blocks there; the parent kills it
// with SIGKILL and opens the cache again.
const (
	crashChildEnv = "PULLSECRET_CACHE_CRASH_CHILD"
	crashSize     = 8 << 20
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(crashChildEnv); mode != "" {
		crashChild(mode, os.Getenv("CRASH_ROOT"), os.Getenv("CRASH_SPOOL"))
		os.Exit(3) // not reached: the parent kills us
	}
	os.Exit(m.Run())
}

// openCrashCache opens the cache of a crash test: "fill" mode on
// OpenFilesystem (spool inside the root, commit by rename), "commit" mode
// on the filesystem driver through Open with the spool elsewhere (commit by
// upload and move).
func openCrashCache(mode, root, spool string) (*Cache, error) {
	if mode == "commit" {
		drv := filesystem.New(filesystem.DriverParameters{RootDirectory: root, MaxThreads: 100})
		return Open(context.Background(), drv, WithSpoolDir(spool))
	}
	return OpenFilesystem(context.Background(), root)
}

func crashChild(mode, root, spool string) {
	content := randomBytes(crashSize, 7)
	d := digest.FromBytes(content)
	c, err := openCrashCache(mode, root, spool)
	if err != nil {
		fmt.Println("ERROR", err)
		return
	}
	ready := func() { fmt.Println("READY") }
	fetch := bytesFetch(content, nil, nil)
	switch mode {
	case "fill":
		// The upstream sends half the blob, then stalls.
		fetch = bytesFetch(content, nil, func(rc io.ReadCloser) io.ReadCloser { return newGate(rc, crashSize/2) })
	case "commit":
		// Stop inside the commit: the upload is written, not yet moved.
		commitHook = func(key) { ready(); time.Sleep(time.Hour) }
	}
	r, err := c.Blob(context.Background(), d, fetch)
	if err != nil {
		fmt.Println("ERROR", err)
		return
	}
	if mode == "fill" {
		if _, err := io.ReadFull(r, make([]byte, crashSize/2-1)); err != nil {
			fmt.Println("ERROR", err)
			return
		}
		ready()
	} else {
		_, _ = io.Copy(io.Discard, r)
	}
	time.Sleep(time.Hour) // (not select{}: the runtime would call that a deadlock)
}

func TestCrashDuringFill(t *testing.T) {
	t.Parallel()
	content := randomBytes(crashSize, 7)
	d := digest.FromBytes(content)
	for _, mode := range []string{"fill", "commit"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			root, spool := t.TempDir(), t.TempDir()
			if mode == "fill" {
				spool = filepath.Join(root, spoolDirName)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashChildEnv+"="+mode, "CRASH_ROOT="+root, "CRASH_SPOOL="+spool)
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			line := make(chan string, 1)
			go func() {
				s, _ := bufio.NewReader(out).ReadString('\n')
				line <- strings.TrimSpace(s)
			}()
			select {
			case l := <-line:
				if l != "READY" {
					_ = cmd.Process.Kill()
					_ = cmd.Wait()
					t.Fatalf("child: %q", l)
				}
			case <-time.After(60 * time.Second):
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatal("child never got ready")
			}
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			_ = cmd.Wait()

			// What the dead process left: a partial spool, or an upload
			// that was never moved into place — and no final path.
			var debris []string
			if mode == "fill" {
				debris = spoolFiles(t, spool)
			} else {
				debris = spoolFiles(t, filepath.Join(root, "_uploads"))
			}
			if len(debris) == 0 {
				t.Fatalf("the child left nothing behind: the test did not kill it mid-%s", mode)
			}
			if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(dataPath(key{KindBlob, d})))); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("final path exists after a crash mid-%s: %v", mode, err)
			}

			c, err := openCrashCache(mode, root, spool)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if left := append(spoolFiles(t, spool), spoolFiles(t, filepath.Join(root, "_uploads"))...); len(left) != 0 {
				t.Fatalf("Open left the dead process's files: %v", left)
			}
			if _, err := c.Blob(context.Background(), d, nil); !errors.Is(err, ErrNotFound) {
				t.Fatalf("after restart: %v, want ErrNotFound (never partial data)", err)
			}
			if s, err := c.Stats(context.Background()); err != nil || s.Count() != 0 {
				t.Fatalf("stats after restart: %+v %v", s, err)
			}
			r, err := c.Blob(context.Background(), d, bytesFetch(content, nil, nil))
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			_ = r.Close()
			if err != nil || !bytes.Equal(got, content) {
				t.Fatalf("fresh fill after restart: %v", err)
			}
		})
	}
}

// A live cache's spool is never mistaken for a dead one's.
func TestOpenKeepsLiveSpools(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	content := randomBytes(1<<20, 8)
	d := digest.FromBytes(content)
	a, err := OpenFilesystem(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	gh := newGateHolder(1000)
	r, err := a.Blob(context.Background(), d, bytesFetch(content, nil, gh.wrap))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// A second process (here: instance) opens the same cache mid-fill.
	b, err := OpenFilesystem(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	gh.gate(t).Open(-1)
	got, _, err := readAllDigest(r)
	if err != nil || got != d {
		t.Fatalf("fill of the first instance broke: %v", err)
	}
	waitFor(t, "commit", func() bool { return committed(b, KindBlob, d) })
}

// Uploads of instances unknown on this machine (another replica, or a
// process whose spool folder is gone) are removed once older than the
// grace; younger ones may be a live commit and stay.
func TestOpenRemovesStaleUploads(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	for _, id := range []string{"aaaa", "bbbb"} {
		p := filepath.Join(root, "_uploads", id, "x", dataName)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(filepath.Join(root, "_uploads", "aaaa", "x", dataName), old, old); err != nil {
		t.Fatal(err)
	}
	c, err := OpenFilesystem(context.Background(), root, WithUploadGrace(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := os.Stat(filepath.Join(root, "_uploads", "aaaa")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale upload kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "_uploads", "bbbb")); err != nil {
		t.Errorf("recent upload of an unknown instance removed: %v", err)
	}
}
