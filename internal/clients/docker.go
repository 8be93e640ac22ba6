package clients

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Dockerd is a Docker daemon private to one test, driven with the Debian
// Docker CLI (/usr/bin/docker). It uses its own containerd (StartContainerd),
// so it never attaches to a system containerd at /run/containerd.
type Dockerd struct {
	Host       string // DOCKER_HOST, unix://...
	Socket     string
	DataRoot   string
	ExecRoot   string
	PidFile    string
	ConfigFile string // daemon.json, passed with --config-file
	Containerd *Containerd

	t   testing.TB
	env *Env
	d   *daemon
}

type dockerdConfig struct {
	daemonJSON map[string]any
	args       []string
}

// DockerdOption configures StartDockerd.
type DockerdOption func(*dockerdConfig)

// WithDaemonConfig merges keys into daemon.json (e.g. "registry-mirrors",
// "insecure-registries"), overriding the defaults of the same name.
func WithDaemonConfig(cfg map[string]any) DockerdOption {
	return func(c *dockerdConfig) {
		for k, v := range cfg {
			c.daemonJSON[k] = v
		}
	}
}

// WithDockerdArgs adds command-line arguments to dockerd. A setting must not
// be given both here and in daemon.json (dockerd refuses to start).
func WithDockerdArgs(args ...string) DockerdOption {
	return func(c *dockerdConfig) { c.args = append(c.args, args...) }
}

// StartDockerd starts a private dockerd (storage driver vfs, no iptables, no
// bridge, debug logging, all state in temporary directories, a unix socket)
// and waits until it answers /_ping. The Docker CLI commands of the returned
// Dockerd use env's DOCKER_CONFIG, HOME and PATH (helper directories first).
// It is stopped by PID at t.Cleanup. Skips (or fails under CI) when docker.io
// or containerd is missing or the test is not root.
func StartDockerd(t testing.TB, env *Env, opts ...DockerdOption) *Dockerd {
	t.Helper()
	Require(t, "dockerd", "docker", "containerd", "ctr", "runc")
	RequireRoot(t)
	ctd := StartContainerd(t)
	dir := t.TempDir()
	// exec-root holds sockets (libnetwork, runc); keep it short.
	short := shortDir(t, 100)
	d := &Dockerd{
		t:          t,
		env:        env,
		Containerd: ctd,
		Socket:     filepath.Join(short, "docker.sock"),
		DataRoot:   filepath.Join(dir, "data"),
		ExecRoot:   filepath.Join(short, "exec"),
		PidFile:    filepath.Join(dir, "docker.pid"),
		ConfigFile: filepath.Join(dir, "daemon.json"),
	}
	d.Host = "unix://" + d.Socket
	cfg := dockerdConfig{daemonJSON: map[string]any{
		"storage-driver":       "vfs",
		"iptables":             false,
		"ip-forward":           false,
		"ip-masq":              false,
		"bridge":               "none",
		"userland-proxy":       false,
		"data-root":            d.DataRoot,
		"exec-root":            d.ExecRoot,
		"hosts":                []string{d.Host},
		"pidfile":              d.PidFile,
		"containerd":           ctd.Address,
		"containerd-namespace": "moby",
		"debug":                true,
		"shutdown-timeout":     5,
	}}
	if dockerdMajor(t) < 23 {
		// 20.10 writes a trust key to /etc/docker/key.json unless told otherwise.
		cfg.daemonJSON["deprecated-key-path"] = filepath.Join(dir, "key.json")
	}
	for _, o := range opts {
		o(&cfg)
	}
	js, err := json.MarshalIndent(cfg.daemonJSON, "", "  ")
	if err != nil {
		t.Fatalf("clients: daemon.json: %v", err)
	}
	if err := writeFile(d.ConfigFile, js); err != nil {
		t.Fatalf("clients: %v", err)
	}
	path, err := LookPath("dockerd")
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	args := append([]string{"--config-file", d.ConfigFile}, cfg.args...)
	dd, err := startDaemon("dockerd", path, args, daemonEnv(dir), filepath.Join(dir, "dockerd.log"),
		[]string{d.DataRoot, d.ExecRoot, short})
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	d.d = dd
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Logf("clients: stopping dockerd: %v", err)
		}
	})
	hc := unixHTTPClient(d.Socket)
	start := time.Now()
	err = dd.waitReady(StartTimeout, func(ctx context.Context) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("_ping: %s %s", resp.Status, b)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	t.Logf("clients: dockerd pid %d ready in %s at %s", dd.pid(), time.Since(start).Round(time.Millisecond), d.Host)
	return d
}

var dockerdVersion struct {
	once  sync.Once
	major int
}

// dockerdMajor is the major version of the installed dockerd (0 if unknown).
func dockerdMajor(t testing.TB) int {
	dockerdVersion.once.Do(func() {
		path, err := LookPath("dockerd")
		if err != nil {
			return
		}
		res, err := run(context.Background(), 10*time.Second, path, []string{"--version"}, daemonEnv(t.TempDir()), "/", nil)
		if err != nil {
			return
		}
		// "Docker version 20.10.24+dfsg1, build 297e128"
		f := strings.Fields(res.Stdout)
		if len(f) >= 3 {
			dockerdVersion.major, _ = strconv.Atoi(strings.SplitN(f[2], ".", 2)[0])
		}
	})
	return dockerdVersion.major
}

func unixHTTPClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		DisableKeepAlives: true,
	}}
}

// Docker runs the Docker CLI against this daemon with the Env's config.
func (d *Dockerd) Docker(ctx context.Context, args ...string) (Result, error) {
	return d.DockerAs(ctx, d.env, args...)
}

// DockerAs runs the Docker CLI against this daemon with another Env's
// DOCKER_CONFIG, HOME and PATH (another user of the same node).
func (d *Dockerd) DockerAs(ctx context.Context, env *Env, args ...string) (Result, error) {
	return d.DockerExec(ctx, env, Command{Args: args})
}

// DockerExec runs the Docker CLI with full control (stdin for
// `login --password-stdin`, extra environment). c.Path is ignored.
func (d *Dockerd) DockerExec(ctx context.Context, env *Env, c Command) (Result, error) {
	c.Path = "docker"
	c.Env = mergeEnv([]string{"DOCKER_HOST=" + d.Host}, c.Env)
	return env.Exec(ctx, c)
}

// RunContainer runs `docker run --rm --network none --ulimit nofile=1024:1024
// IMAGE cmd...` (the flags that work on this kind of machine) and returns its
// output. With BusyboxImage, cmd can be e.g. "sh", "-c", "env".
func (d *Dockerd) RunContainer(ctx context.Context, image string, cmd ...string) (Result, error) {
	return d.RunContainerWith(ctx, nil, image, cmd...)
}

// RunContainerWith is RunContainer with more `docker run` flags (e.g.
// "-e", "K=V", "--pull", "always"), placed after the defaults.
func (d *Dockerd) RunContainerWith(ctx context.Context, flags []string, image string, cmd ...string) (Result, error) {
	args := []string{"run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024"}
	args = append(append(append(args, flags...), image), cmd...)
	return d.Docker(ctx, args...)
}

// Logs returns dockerd's output so far (debug level), followed by its
// containerd's.
func (d *Dockerd) Logs() string {
	return d.d.logs() + "\n--- containerd ---\n" + d.Containerd.Logs()
}

// LogFile is the file dockerd writes its own log to.
func (d *Dockerd) LogFile() string { return d.d.logPath }

// PID is dockerd's process id.
func (d *Dockerd) PID() int { return d.d.pid() }

// Stop stops dockerd by PID (SIGTERM, SIGKILL after 20 s), kills what it left
// behind, detaches mounts under its directories, then stops its containerd.
// Safe to call twice; it is called at t.Cleanup.
func (d *Dockerd) Stop() error {
	return errors.Join(d.d.stop(20*time.Second), d.Containerd.Stop())
}
