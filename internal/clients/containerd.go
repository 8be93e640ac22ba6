package clients

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Containerd is a containerd daemon private to one test: its own root,
// state, temp and plugin directories and its own gRPC/ttrpc sockets. Nothing
// is shared with a system containerd.
type Containerd struct {
	Address    string // gRPC unix socket path (ctr --address)
	Root       string
	State      string
	ConfigFile string

	t       testing.TB
	d       *daemon
	dir     string
	timeout time.Duration
}

type containerdConfig struct {
	extraTOML string
	timeout   time.Duration
}

// ContainerdOption configures StartContainerd.
type ContainerdOption func(*containerdConfig)

// WithContainerdConfig appends TOML (config version 2) to the generated config.toml.
func WithContainerdConfig(toml string) ContainerdOption {
	return func(c *containerdConfig) { c.extraTOML += "\n" + toml + "\n" }
}

// WithCtrTimeout changes the per-command timeout of Ctr (default DefaultTimeout).
func WithCtrTimeout(d time.Duration) ContainerdOption {
	return func(c *containerdConfig) { c.timeout = d }
}

// StartContainerd starts a private containerd (config version 2, which
// containerd 1.6 to 2.x read; the CRI plugin disabled) and waits until `ctr
// version` answers. It is stopped by PID at t.Cleanup. Skips (or fails under
// CI) when containerd/ctr/runc are missing or the test is not root.
func StartContainerd(t testing.TB, opts ...ContainerdOption) *Containerd {
	t.Helper()
	Require(t, "containerd", "ctr", "runc")
	RequireRoot(t)
	cfg := containerdConfig{timeout: DefaultTimeout}
	for _, o := range opts {
		o(&cfg)
	}
	c, err := startContainerd(t, cfg)
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	return c
}

func startContainerd(t testing.TB, cfg containerdConfig) (*Containerd, error) {
	dir := t.TempDir()
	// Unix socket paths must stay short (< 108 bytes).
	sock := shortDir(t, len("/containerd.sock.ttrpc"))
	c := &Containerd{
		t:          t,
		dir:        dir,
		Root:       filepath.Join(dir, "root"),
		State:      filepath.Join(dir, "state"),
		Address:    filepath.Join(sock, "containerd.sock"),
		ConfigFile: filepath.Join(dir, "config.toml"),
		timeout:    cfg.timeout,
	}
	for _, d := range []string{c.Root, c.State, filepath.Join(dir, "tmp"), filepath.Join(dir, "opt")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	toml := fmt.Sprintf(`version = 2
root = %s
state = %s
temp = %s
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %s

[ttrpc]
  address = %s

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = %s
`, q(c.Root), q(c.State), q(filepath.Join(dir, "tmp")), q(c.Address), q(c.Address+".ttrpc"), q(filepath.Join(dir, "opt")))
	toml += cfg.extraTOML
	if err := writeFile(c.ConfigFile, []byte(toml)); err != nil {
		return nil, err
	}
	path, err := LookPath("containerd")
	if err != nil {
		return nil, err
	}
	d, err := startDaemon("containerd", path, []string{"--config", c.ConfigFile},
		daemonEnv(dir), filepath.Join(dir, "containerd.log"), []string{c.Root, c.State, c.Address, dir, sock})
	if err != nil {
		return nil, err
	}
	c.d = d
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Logf("clients: stopping containerd: %v", err)
		}
	})
	ctrPath, err := LookPath("ctr")
	if err != nil {
		return nil, err
	}
	start := time.Now()
	err = d.waitReady(StartTimeout, func(ctx context.Context) error {
		if _, err := os.Stat(c.Address); err != nil {
			return err
		}
		_, err := run(ctx, 5*time.Second, ctrPath, []string{"--address", c.Address, "version"}, daemonEnv(dir), dir, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	t.Logf("clients: containerd pid %d ready in %s at %s", d.pid(), time.Since(start).Round(time.Millisecond), c.Address)
	return c, nil
}

// Ctr runs `ctr --address ADDRESS args...` (namespace "default", snapshotter
// "native", which works on any backing filesystem). ctr never calls a
// credential helper: pass --user or a hosts.toml header.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (Result, error) {
	path, err := LookPath("ctr")
	if err != nil {
		return Result{Cmd: "ctr", ExitCode: -1}, err
	}
	env := daemonEnv(c.dir, "CONTAINERD_NAMESPACE=default", "CONTAINERD_SNAPSHOTTER=native")
	res, err := run(ctx, c.timeout, path, append([]string{"--address", c.Address}, args...), env, c.dir, nil)
	c.t.Logf("clients: $ %s  (exit %d, %s)", res.Cmd, res.ExitCode, res.Duration.Round(time.Millisecond))
	return res, err
}

// Logs returns containerd's output so far (log level debug).
func (c *Containerd) Logs() string { return c.d.logs() }

// LogFile is the file containerd writes its log to.
func (c *Containerd) LogFile() string { return c.d.logPath }

// PID is containerd's process id.
func (c *Containerd) PID() int { return c.d.pid() }

// Stop stops containerd (SIGTERM, then SIGKILL after 10 s), kills shims it
// left and detaches mounts under its directories. Safe to call twice; it is
// called at t.Cleanup.
func (c *Containerd) Stop() error { return c.d.stop(10 * time.Second) }

// HostEntry is one [host."URL"] of a containerd hosts.toml.
type HostEntry struct {
	URL          string            // e.g. "http://127.0.0.1:5000"
	Capabilities []string          // default: pull, resolve
	Header       map[string]string // e.g. {"Authorization": "Bearer ..."}
	SkipVerify   bool
	CA           string // CA certificate file
	OverridePath bool   // the URL has a path that replaces /v2
}

// HostsTOML renders a containerd hosts.toml for server (e.g.
// "https://mirror.example") with the given mirror hosts, tried in order.
func HostsTOML(server string, hosts ...HostEntry) string {
	var b strings.Builder
	fmt.Fprintf(&b, "server = %s\n", q(server))
	for _, h := range hosts {
		caps := h.Capabilities
		if len(caps) == 0 {
			caps = []string{"pull", "resolve"}
		}
		qc := make([]string, len(caps))
		for i, c := range caps {
			qc[i] = q(c)
		}
		fmt.Fprintf(&b, "\n[host.%s]\n  capabilities = [%s]\n", q(h.URL), strings.Join(qc, ", "))
		if h.SkipVerify {
			b.WriteString("  skip_verify = true\n")
		}
		if h.CA != "" {
			fmt.Fprintf(&b, "  ca = %s\n", q(h.CA))
		}
		if h.OverridePath {
			b.WriteString("  override_path = true\n")
		}
		if len(h.Header) > 0 {
			fmt.Fprintf(&b, "  [host.%s.header]\n", q(h.URL))
			for k, v := range h.Header {
				fmt.Fprintf(&b, "    %s = [%s]\n", q(k), q(v))
			}
		}
	}
	return b.String()
}

// WriteHostsDir writes dir/<registryHost>/hosts.toml (HostsTOML) and returns
// dir, ready for `ctr images pull --hosts-dir dir registryHost/repo:tag`.
func WriteHostsDir(dir, registryHost, server string, hosts ...HostEntry) (string, error) {
	if err := writeFile(filepath.Join(dir, registryHost, "hosts.toml"), []byte(HostsTOML(server, hosts...))); err != nil {
		return "", err
	}
	return dir, nil
}

// q quotes s as a TOML basic string.
func q(s string) string { return strconv.Quote(s) }
