// Package clients drives real container clients (crane, skopeo, podman, the
// Docker CLI against a private dockerd, containerd's ctr) from Go tests.
//
// Every client runs with an explicit, minimal environment: PATH (the helper
// directories first, then the test process's PATH), HOME and TMPDIR in
// temporary directories, DOCKER_CONFIG and REGISTRY_AUTH_FILE pointing at
// per-test config files, and whatever the test adds with WithEnv. Nothing is
// read from the real home directory. Every command runs under a context with
// a timeout and its stdout and stderr are captured separately, so tests can
// grep them (for instance for a canary secret).
//
// Daemons (dockerd, containerd) get their own temporary directories and
// sockets, their output goes to a log file the test can read, and they are
// stopped by PID in t.Cleanup, together with any process they left behind.
//
// Typical use:
//
//	env := clients.NewEnv(t, clients.WithHelperDir(binDir), clients.WithEnv("PULLSECRET_HOME="+home))
//	env.CredHelper("127.0.0.1:5000", "pullsecret") // config.json and auth.json credHelpers
//	res, err := env.Crane(ctx, "pull", "--insecure", ref, tarPath)
//	res, err = env.Skopeo(ctx, "copy", "--authfile", env.AuthFile(), "--src-tls-verify=false", "docker://"+ref, "dir:"+out)
//	d := clients.StartDockerd(t, env)
//	res, err = d.Docker(ctx, "pull", ref)
//	res, err = d.RunContainer(ctx, ref, "sh", "-c", "env")
//	p := clients.NewPodman(t, env)
//	res, err = p.Podman(ctx, "pull", "--tls-verify=false", ref)
//	c := clients.StartContainerd(t)
//	res, err = c.Ctr(ctx, "images", "pull", "--hosts-dir", hostsDir, "mirror.example/t/app:v1")
//
// Constructors of daemons and podman skip the test (via Require/RequireRoot)
// when a program is missing or the test is not root; with CI or
// PULLSECRET_REQUIRE_CLIENTS set they fail it instead. .ci/install-clients.sh
// installs everything on Debian 12.
//
// The package is for tests only; it is not part of the product API.
package clients

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// DefaultTimeout bounds every client command whose context has no earlier
// deadline. A hung client fails the test instead of hanging it.
const DefaultTimeout = 90 * time.Second

// Result is what a client command produced.
type Result struct {
	Cmd      string // the command line, for messages
	Stdout   string
	Stderr   string
	ExitCode int // -1 when the process did not exit normally (killed, timed out, not started)
	Duration time.Duration
}

// Output returns stdout followed by stderr.
func (r Result) Output() string { return r.Stdout + r.Stderr }

// Contains reports whether s occurs in stdout or stderr.
func (r Result) Contains(s string) bool {
	return strings.Contains(r.Stdout, s) || strings.Contains(r.Stderr, s)
}

// Command describes one process to run with Env.Exec.
type Command struct {
	Path  string   // a name looked up with LookPath, or an absolute path
	Args  []string // arguments, without the program name
	Stdin []byte   // nil: stdin is /dev/null
	Env   []string // added to (and overriding) the Env's environment
	Dir   string   // working directory; default: the Env's work directory
}

// Env is a set of per-test client configuration: a HOME, a Docker config
// directory, a containers auth file and registries.conf, and the environment
// every client command gets.
type Env struct {
	t       testing.TB
	dir     string
	home    string
	tmp     string
	work    string
	dockerC string // DOCKER_CONFIG directory
	auth    string // containers auth.json
	regConf string // registries.conf

	helperDirs []string
	extraEnv   []string
	timeout    time.Duration

	mu         sync.Mutex
	credHelper map[string]string
	credsStore string
	auths      map[string]authEntry
}

type authEntry struct {
	Auth          string `json:"auth,omitempty"`
	IdentityToken string `json:"identitytoken,omitempty"`
}

// Option configures NewEnv.
type Option func(*Env)

// WithHelperDir puts directories holding docker-credential-* binaries at the
// front of PATH, in the order given.
func WithHelperDir(dirs ...string) Option {
	return func(e *Env) { e.helperDirs = append(e.helperDirs, dirs...) }
}

// WithEnv adds KEY=VALUE variables to every command's environment. They
// override the defaults (HOME, TMPDIR, DOCKER_CONFIG, ...) of the same name.
func WithEnv(kv ...string) Option {
	return func(e *Env) { e.extraEnv = append(e.extraEnv, kv...) }
}

// WithTimeout changes the per-command timeout (default DefaultTimeout).
func WithTimeout(d time.Duration) Option {
	return func(e *Env) { e.timeout = d }
}

// NewEnv makes a fresh client environment under t.TempDir().
func NewEnv(t testing.TB, opts ...Option) *Env {
	t.Helper()
	dir := t.TempDir()
	e := &Env{
		t:          t,
		dir:        dir,
		home:       filepath.Join(dir, "home"),
		tmp:        filepath.Join(dir, "tmp"),
		work:       filepath.Join(dir, "work"),
		dockerC:    filepath.Join(dir, "docker"),
		auth:       filepath.Join(dir, "containers", "auth.json"),
		regConf:    filepath.Join(dir, "containers", "registries.conf"),
		timeout:    DefaultTimeout,
		credHelper: map[string]string{},
		auths:      map[string]authEntry{},
	}
	for _, o := range opts {
		o(e)
	}
	for _, d := range []string{e.home, e.tmp, e.work, e.dockerC, filepath.Dir(e.auth),
		filepath.Join(e.home, ".config", "containers")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("clients: %v", err)
		}
	}
	// Signature policy: containers/image reads $HOME/.config/containers/policy.json
	// before /etc/containers/policy.json, so the host's policy does not matter.
	mustWrite(t, filepath.Join(e.home, ".config", "containers", "policy.json"),
		`{"default":[{"type":"insecureAcceptAnything"}]}`+"\n")
	mustWrite(t, e.regConf, "unqualified-search-registries = []\nshort-name-mode = \"permissive\"\n")
	if err := e.writeConfigs(); err != nil {
		t.Fatalf("clients: %v", err)
	}
	return e
}

// Dir is the Env's own temporary directory.
func (e *Env) Dir() string { return e.dir }

// Home is the HOME every command gets.
func (e *Env) Home() string { return e.home }

// WorkDir is the working directory commands run in (unless Command.Dir says otherwise).
func (e *Env) WorkDir() string { return e.work }

// DockerConfigDir is DOCKER_CONFIG (holding config.json).
func (e *Env) DockerConfigDir() string { return e.dockerC }

// DockerConfigFile is DOCKER_CONFIG/config.json.
func (e *Env) DockerConfigFile() string { return filepath.Join(e.dockerC, "config.json") }

// AuthFile is the containers auth.json (REGISTRY_AUTH_FILE).
func (e *Env) AuthFile() string { return e.auth }

// RegistriesConf is the registries.conf named by CONTAINERS_REGISTRIES_CONF.
func (e *Env) RegistriesConf() string { return e.regConf }

// SetRegistriesConf replaces registries.conf (e.g. to add a [[registry.mirror]]).
func (e *Env) SetRegistriesConf(content string) {
	e.t.Helper()
	mustWrite(e.t, e.regConf, content)
}

// CredHelper makes host's credentials come from docker-credential-<suffix>,
// in both the Docker config.json and the containers auth.json. host is the
// key exactly as the clients look it up ("127.0.0.1:5000", "ghcr.io").
func (e *Env) CredHelper(host, suffix string) {
	e.t.Helper()
	e.mu.Lock()
	e.credHelper[host] = suffix
	e.mu.Unlock()
	if err := e.writeConfigs(); err != nil {
		e.t.Fatalf("clients: %v", err)
	}
}

// CredsStore sets the Docker config.json credsStore (containers/image has no
// equivalent; it is not written to auth.json).
func (e *Env) CredsStore(suffix string) {
	e.t.Helper()
	e.mu.Lock()
	e.credsStore = suffix
	e.mu.Unlock()
	if err := e.writeConfigs(); err != nil {
		e.t.Fatalf("clients: %v", err)
	}
}

// Login stores a static username/password for host in both config files
// ("auths"), as `docker login` without a helper would.
func (e *Env) Login(host, username, password string) {
	e.t.Helper()
	e.mu.Lock()
	e.auths[host] = authEntry{Auth: base64.StdEncoding.EncodeToString([]byte(username + ":" + password))}
	e.mu.Unlock()
	if err := e.writeConfigs(); err != nil {
		e.t.Fatalf("clients: %v", err)
	}
}

func (e *Env) writeConfigs() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	type cfg struct {
		Auths       map[string]authEntry `json:"auths"`
		CredHelpers map[string]string    `json:"credHelpers,omitempty"`
		CredsStore  string               `json:"credsStore,omitempty"`
	}
	docker, err := json.MarshalIndent(cfg{Auths: e.auths, CredHelpers: e.credHelper, CredsStore: e.credsStore}, "", "  ")
	if err != nil {
		return err
	}
	containers, err := json.MarshalIndent(cfg{Auths: e.auths, CredHelpers: e.credHelper}, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFile(e.DockerConfigFile(), append(docker, '\n')); err != nil {
		return err
	}
	return writeFile(e.auth, append(containers, '\n'))
}

// PATH is the PATH every command gets: the helper directories, then the
// test process's PATH.
func (e *Env) PATH() string {
	parts := append([]string{}, e.helperDirs...)
	if p := os.Getenv("PATH"); p != "" {
		parts = append(parts, p)
	} else {
		parts = append(parts, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return strings.Join(parts, string(os.PathListSeparator))
}

// Environ is the whole environment of a client command (before Command.Env).
func (e *Env) Environ() []string {
	env := []string{
		"PATH=" + e.PATH(),
		"HOME=" + e.home,
		"TMPDIR=" + e.tmp,
		"DOCKER_CONFIG=" + e.dockerC,
		"REGISTRY_AUTH_FILE=" + e.auth,
		"CONTAINERS_REGISTRIES_CONF=" + e.regConf,
	}
	return mergeEnv(env, e.extraEnv)
}

// Exec runs one command under ctx (further bounded by the Env's timeout) and
// returns its captured output. The error is non-nil when the command could
// not start, exited non-zero or timed out; it quotes the command's stderr.
func (e *Env) Exec(ctx context.Context, c Command) (Result, error) {
	path, err := LookPath(c.Path)
	if err != nil {
		return Result{Cmd: c.Path, ExitCode: -1}, err
	}
	dir := c.Dir
	if dir == "" {
		dir = e.work
	}
	res, err := run(ctx, e.timeout, path, c.Args, mergeEnv(e.Environ(), c.Env), dir, c.Stdin)
	e.t.Logf("clients: $ %s  (exit %d, %s)", res.Cmd, res.ExitCode, res.Duration.Round(time.Millisecond))
	return res, err
}

// Run runs a program with arguments in this Env.
func (e *Env) Run(ctx context.Context, program string, args ...string) (Result, error) {
	return e.Exec(ctx, Command{Path: program, Args: args})
}

// Crane runs crane (go-containerregistry). Call Require(t, "crane") first to
// skip, rather than fail, where crane is not installed.
func (e *Env) Crane(ctx context.Context, args ...string) (Result, error) {
	return e.Exec(ctx, Command{Path: "crane", Args: args})
}

// Skopeo runs `skopeo --registries-conf REGISTRIES_CONF args...`: skopeo
// (1.9) ignores CONTAINERS_REGISTRIES_CONF, which podman honours. It reads
// REGISTRY_AUTH_FILE; pass --authfile env.AuthFile() to be explicit. Call
// Require(t, "skopeo") first to skip where it is missing.
func (e *Env) Skopeo(ctx context.Context, args ...string) (Result, error) {
	return e.Exec(ctx, Command{Path: "skopeo", Args: append([]string{"--registries-conf", e.regConf}, args...)})
}

// run is the one place a client process is started.
func run(ctx context.Context, timeout time.Duration, path string, args, env []string, dir string, stdin []byte) (Result, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	res := Result{Cmd: shellQuote(append([]string{path}, args...)), ExitCode: -1}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = env
	cmd.Dir = dir
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// Own process group, so a timeout kills the client and its children;
	// and die with the test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// A grandchild holding the output pipes open must not hang Wait.
	cmd.WaitDelay = 5 * time.Second

	start := time.Now()
	err := cmd.Run()
	res.Duration = time.Since(start)
	res.Stdout = stdout.String()
	res.Stderr = stderr.String()
	if cmd.ProcessState != nil {
		res.ExitCode = cmd.ProcessState.ExitCode()
	}
	if ctxErr := ctx.Err(); ctxErr != nil && err != nil {
		return res, fmt.Errorf("%s: %w after %s (killed)\nstderr: %s", res.Cmd, ctxErr,
			res.Duration.Round(time.Millisecond), tail(res.Stderr, 4096))
	}
	if err != nil {
		return res, fmt.Errorf("%s: %w\nstderr: %s", res.Cmd, err, tail(res.Stderr, 4096))
	}
	return res, nil
}

// installHints says how to get each program (Debian package or go install).
var installHints = map[string]string{
	"crane":      "go install github.com/google/go-containerregistry/cmd/crane@v0.22.1",
	"skopeo":     "apt-get install skopeo",
	"podman":     "apt-get install podman runc conmon uidmap",
	"conmon":     "apt-get install conmon",
	"runc":       "apt-get install runc",
	"docker":     "apt-get install docker.io (the Debian client /usr/bin/docker)",
	"dockerd":    "apt-get install docker.io",
	"containerd": "apt-get install containerd",
	"ctr":        "apt-get install containerd",
	"htpasswd":   "apt-get install apache2-utils",
	"busybox":    "apt-get install busybox-static",
	"versitygw":  "go install github.com/versity/versitygw/cmd/versitygw@v1.8.0",
}

// goInstalled are the programs `go install` provides: LookPath also looks
// where it puts them.
var goInstalled = map[string]bool{"crane": true, "versitygw": true}

// LookPath resolves a client program to an absolute path. "docker" prefers
// the Debian client /usr/bin/docker; crane and versitygw are also looked
// for in $GOBIN, $GOPATH/bin and ~/go/bin (where go install puts them).
func LookPath(name string) (string, error) {
	if filepath.IsAbs(name) {
		if _, err := os.Stat(name); err != nil {
			return "", err
		}
		return name, nil
	}
	switch name {
	case "docker":
		if isExecutable("/usr/bin/docker") {
			return "/usr/bin/docker", nil
		}
	case "busybox":
		// The image needs the static build; Debian's busybox-static puts it here.
		if isExecutable("/bin/busybox") {
			return "/bin/busybox", nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	if goInstalled[name] {
		var dirs []string
		if d := os.Getenv("GOBIN"); d != "" {
			dirs = append(dirs, d)
		}
		for _, gp := range filepath.SplitList(os.Getenv("GOPATH")) {
			if gp != "" {
				dirs = append(dirs, filepath.Join(gp, "bin"))
			}
		}
		if h, err := os.UserHomeDir(); err == nil {
			dirs = append(dirs, filepath.Join(h, "go", "bin"))
		}
		for _, d := range dirs {
			if p := filepath.Join(d, name); isExecutable(p) {
				return p, nil
			}
		}
	}
	hint := installHints[name]
	if hint == "" {
		hint = "install it"
	}
	return "", fmt.Errorf("%s not found in PATH (%s): %w", name, hint, exec.ErrNotFound)
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// mustNotSkip: CI installs every client (.ci/install-clients.sh), so
// there a missing client is a failure, not a skip.
func mustNotSkip() bool {
	if v := os.Getenv("PULLSECRET_REQUIRE_CLIENTS"); v != "" && v != "0" && v != "false" {
		return true
	}
	v := os.Getenv("CI")
	return v != "" && v != "0" && v != "false"
}

// Require skips the test unless every named program is installed; the skip
// message says how to install what is missing. When CI or
// PULLSECRET_REQUIRE_CLIENTS is set, a missing program fails the test instead.
func Require(t testing.TB, names ...string) {
	t.Helper()
	var missing []string
	for _, n := range names {
		if _, err := LookPath(n); err != nil {
			hint := installHints[n]
			if hint == "" {
				hint = "install it"
			}
			missing = append(missing, fmt.Sprintf("%s (%s; or run .ci/install-clients.sh)", n, hint))
		}
	}
	if len(missing) == 0 {
		return
	}
	Unavailable(t, "clients: missing "+strings.Join(missing, ", "))
}

// Unavailable skips the test for want of what msg names, or fails it when
// CI or PULLSECRET_REQUIRE_CLIENTS is set: CI installs everything the tests
// drive, so there a missing program is a failure, not a skip.
func Unavailable(t testing.TB, msg string) {
	t.Helper()
	if mustNotSkip() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// RequireRoot skips the test unless it runs as root (rootful dockerd,
// containerd and podman need it). Under CI it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	Unavailable(t, "clients: needs root (rootful dockerd/containerd/podman)")
}

// mergeEnv returns base with each KEY=VALUE of extra replacing the same KEY.
func mergeEnv(base, extra []string) []string {
	out := make([]string, 0, len(base)+len(extra))
	idx := map[string]int{}
	for _, kv := range append(append([]string{}, base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func mustWrite(t testing.TB, path, content string) {
	t.Helper()
	if err := writeFile(path, []byte(content)); err != nil {
		t.Fatalf("clients: %v", err)
	}
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a != "" && !strings.ContainsAny(a, " \t\n'\"\\$`|&;<>()*?[]{}!#~") {
			q[i] = a
			continue
		}
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}
