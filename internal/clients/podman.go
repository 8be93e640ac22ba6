package clients

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Podman is a rootful podman with a storage root, run root, libpod tmp dir
// and containers.conf private to one test. Podman has no daemon: each call is
// one process, with the Env's HOME, PATH and REGISTRY_AUTH_FILE.
type Podman struct {
	Root        string // --root (graphroot)
	RunRoot     string // --runroot
	TmpDir      string // libpod tmp_dir (state, file locks, events)
	ConfFile    string // CONTAINERS_CONF
	StorageConf string // CONTAINERS_STORAGE_CONF

	t   testing.TB
	env *Env
	dir string
}

// PodmanStorageDriver is the storage driver NewPodman uses: vfs works on any
// backing filesystem (overlay also works on ext4 here but not on overlayfs,
// e.g. inside a CI container) and leaves no mounts behind.
const PodmanStorageDriver = "vfs"

// NewPodman prepares a fresh podman: storage in temporary directories (a
// reused root made `run --rm` hang 20 s), runtime runc with cgroup manager
// cgroupfs and ulimits nofile/nproc 1024 (crun and the default cgroup manager
// fail here), file locks and events under its own tmp dir (the default shm
// locks are shared by every podman on the machine), no OCI hooks. At
// t.Cleanup it removes leftover containers and kills processes left in its
// directories. Skips (or fails under CI) when podman/runc/conmon are missing
// or the test is not root.
func NewPodman(t testing.TB, env *Env) *Podman {
	t.Helper()
	Require(t, "podman", "runc", "conmon")
	RequireRoot(t)
	dir := t.TempDir()
	// runroot holds conmon's attach sockets; keep it short.
	short := shortDir(t, 90)
	p := &Podman{
		t:           t,
		env:         env,
		dir:         dir,
		Root:        filepath.Join(dir, "root"),
		RunRoot:     filepath.Join(short, "run"),
		TmpDir:      filepath.Join(short, "libpod"),
		ConfFile:    filepath.Join(dir, "containers.conf"),
		StorageConf: filepath.Join(dir, "storage.conf"),
	}
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = %s
lock_type = "file"
tmp_dir = %s
static_dir = %s
volume_path = %s
hooks_dir = [%s]
image_copy_tmp_dir = %s

[network]
network_config_dir = %s
`, q(filepath.Join(dir, "events.log")), q(p.TmpDir), q(filepath.Join(p.Root, "libpod")),
		q(filepath.Join(p.Root, "volumes")), q(filepath.Join(dir, "hooks.d")), q(env.tmp),
		q(filepath.Join(dir, "networks")))
	mustWrite(t, p.ConfFile, conf)
	mustWrite(t, p.StorageConf, fmt.Sprintf("[storage]\ndriver = %s\ngraphroot = %s\nrunroot = %s\n",
		q(PodmanStorageDriver), q(p.Root), q(p.RunRoot)))
	markers := []string{p.Root, p.RunRoot, p.TmpDir, dir, short}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		res, err := p.Podman(ctx, "ps", "-aq")
		if err == nil && strings.TrimSpace(res.Stdout) != "" {
			if _, err := p.Podman(ctx, "rm", "-af", "-t", "0"); err != nil {
				t.Logf("clients: podman rm: %v", err)
			}
		}
		if pids := killLeftovers(markers); len(pids) > 0 {
			t.Logf("clients: podman left processes behind, killed: %v", pids)
		}
		for _, m := range markers {
			if err := unmountUnder(m); err != nil {
				t.Logf("clients: %v", err)
			}
		}
	})
	return p
}

// Environ is the environment of podman commands: the Env's plus
// CONTAINERS_CONF and CONTAINERS_STORAGE_CONF.
func (p *Podman) Environ() []string {
	return mergeEnv(p.env.Environ(), p.extraEnv())
}

func (p *Podman) extraEnv() []string {
	return []string{"CONTAINERS_CONF=" + p.ConfFile, "CONTAINERS_STORAGE_CONF=" + p.StorageConf}
}

// Podman runs `podman --root R --runroot RR --storage-driver vfs args...`.
func (p *Podman) Podman(ctx context.Context, args ...string) (Result, error) {
	return p.Exec(ctx, Command{Args: args})
}

// Exec runs podman with full control (stdin, extra environment); c.Path is
// ignored and the global storage flags are put before c.Args.
func (p *Podman) Exec(ctx context.Context, c Command) (Result, error) {
	c.Path = "podman"
	c.Args = append([]string{"--root", p.Root, "--runroot", p.RunRoot, "--storage-driver", PodmanStorageDriver}, c.Args...)
	c.Env = mergeEnv(p.extraEnv(), c.Env)
	return p.env.Exec(ctx, c)
}

// RunContainer runs `podman run --rm --network none --runtime runc
// --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 IMAGE cmd...` (the
// flags that work on this kind of machine; the cgroup manager comes from
// containers.conf). With BusyboxImage, cmd can be e.g. "sh", "-c", "env".
func (p *Podman) RunContainer(ctx context.Context, image string, cmd ...string) (Result, error) {
	return p.RunContainerWith(ctx, nil, image, cmd...)
}

// RunContainerWith is RunContainer with more `podman run` flags (e.g.
// "-e", "K=V", "--tls-verify=false", "--pull", "always"), placed after the
// defaults.
func (p *Podman) RunContainerWith(ctx context.Context, flags []string, image string, cmd ...string) (Result, error) {
	args := []string{"run", "--rm", "--network", "none", "--runtime", "runc",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}
	args = append(append(append(args, flags...), image), cmd...)
	return p.Podman(ctx, args...)
}
