package spec_test

// End to end with real runtimes: `pullsecret spec pull` hands the pull
// secret to dockerd, podman and containerd; the test then plays the
// platform, runs the container as the runtime plan says, and checks that the
// pull credential reached nothing the container can see, while the runtime
// secret did.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/spec"
)

const (
	// e2ePullCanary is the registry password: the image pull secret.
	e2ePullCanary = "canary-pull-pw-5a0c77e1"
	// The runtime secrets the platform delivers, as the plan says.
	e2eRuntimeKey   = "runtime-openai-key-3b9d"
	e2eRuntimeToken = "runtime-room-token-c4e8"
)

// e2eWorld is a private registry with a runnable image, a pullsecret home
// holding its pull secret, and a spec naming it.
type e2eWorld struct {
	t       *testing.T
	bin     string
	home    string
	tmp     string // TMPDIR of pullsecret: must be empty after each pull
	reg     *registry.Registry
	env     *clients.Env
	ref     string
	digest  string
	specF   string
	secrets string // host folder mounted at /run/secrets/app-keys

	mu     sync.Mutex
	output []string
}

func newE2EWorld(t *testing.T, auth string) *e2eWorld {
	t.Helper()
	ctx := context.Background()
	w := &e2eWorld{t: t, bin: testbin.Build(t, "pullsecret", "docker-credential-pullsecret"), home: filepath.Join(t.TempDir(), "home"), tmp: t.TempDir()}
	users := map[string]string{"bot": e2ePullCanary}
	opt := registry.WithHTPasswd(users)
	if auth == "token" {
		opt = registry.WithTokenAuth(users)
	}
	reg, err := registry.Start(ctx, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	w.reg = reg
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	w.ref = reg.Ref("team/app", "v1")
	d, err := clients.Push(ctx, w.ref, img, remote.WithAuth(&authn.Basic{Username: "bot", Password: e2ePullCanary}))
	if err != nil {
		t.Fatal(err)
	}
	w.digest = d.String()
	// The client environment has no credentials of its own for the
	// registry: only what spec pull hands the runtime.
	w.env = clients.NewEnv(t, clients.WithEnv("PULLSECRET_HOME="+w.home, "TMPDIR="+w.tmp))
	w.pullsecret(e2ePullCanary+"\n", "secret", "create", "team", "--registry", reg.Addr()+"/team", "--username", "bot", "--password-stdin", "--project", "acme")
	w.specF = filepath.Join(t.TempDir(), "service.yaml")
	specText := fmt.Sprintf(`version: v1
kind: Service
metadata: {name: app}
container:
  image: %s
  pull_secret: team
  secrets: [app-keys]
  environment:
    - {name: LOG_LEVEL, value: info}
    - {name: APP_TOKEN, secret: {name: app-room, key: token}}
`, w.ref)
	if err := os.WriteFile(w.specF, []byte(specText), 0o644); err != nil {
		t.Fatal(err)
	}
	w.secrets = t.TempDir()
	if err := os.WriteFile(filepath.Join(w.secrets, "OPENAI_API_KEY"), []byte(e2eRuntimeKey), 0o644); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *e2eWorld) record(r clients.Result) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.output = append(w.output, r.Stdout, r.Stderr)
}

func (w *e2eWorld) pullsecret(stdin string, args ...string) clients.Result {
	w.t.Helper()
	return w.pullsecretEnv(nil, stdin, args...)
}

func (w *e2eWorld) pullsecretEnv(env []string, stdin string, args ...string) clients.Result {
	w.t.Helper()
	c := clients.Command{Path: filepath.Join(w.bin, "pullsecret"), Args: args, Env: env}
	if stdin != "" {
		c.Stdin = []byte(stdin)
	}
	r, err := w.env.Exec(context.Background(), c)
	w.record(r)
	if err != nil {
		w.t.Fatalf("pullsecret %s: %v\n%s", strings.Join(args, " "), err, r.Output())
	}
	return r
}

// specPull runs `pullsecret spec pull` and returns the pinned plan.
func (w *e2eWorld) specPull(env []string, args ...string) *spec.Plan {
	w.t.Helper()
	return w.specPullExpect(env, w.reg.Addr()+"/team/app@"+w.digest, args...)
}

// specPullExpect is specPull for a runtime image other than the registry's.
func (w *e2eWorld) specPullExpect(env []string, wantImage string, args ...string) *spec.Plan {
	w.t.Helper()
	r := w.pullsecretEnv(env, "", append([]string{"spec", "pull", w.specF, "--project", "acme", "-o", "json"}, args...)...)
	var p spec.Plan
	if err := json.Unmarshal([]byte(r.Stdout), &p); err != nil {
		w.t.Fatalf("spec pull output: %v\n%s", err, r.Output())
	}
	if !p.Runtime.Pinned || p.Runtime.Digest != w.digest || p.Runtime.Image != wantImage {
		w.t.Fatalf("runtime plan not pinned to the pushed digest %s as %s: %+v", w.digest, wantImage, p.Runtime)
	}
	w.noTemporaryFiles()
	return &p
}

// noTemporaryFiles: spec pull removed every temporary file.
func (w *e2eWorld) noTemporaryFiles() {
	w.t.Helper()
	ents, _ := os.ReadDir(w.tmp)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "pullsecret-") {
			w.t.Errorf("temporary file left on disk: %s", filepath.Join(w.tmp, e.Name()))
		}
	}
}

// runtimeArgs plays the platform: the environment and mounts of the
// runtime plan, with the runtime secrets' values.
func (w *e2eWorld) runtimeArgs(p *spec.Plan, envFlag string, mount func(src, dst string) []string) []string {
	w.t.Helper()
	values := map[string]string{"app-room/token": e2eRuntimeToken}
	var args []string
	for _, e := range p.Runtime.Environment {
		switch {
		case e.Secret != nil:
			v, ok := values[e.Secret.Name+"/"+e.Secret.Key]
			if !ok {
				w.t.Fatalf("the plan asks for secret %s key %s, which the platform does not have", e.Secret.Name, e.Secret.Key)
			}
			args = append(args, envFlag, e.Name+"="+v)
		case e.Value != nil:
			args = append(args, envFlag, e.Name+"="+*e.Value)
		}
	}
	for _, s := range p.Runtime.Secrets {
		if s.Name != "app-keys" {
			w.t.Fatalf("the plan mounts an unknown secret %s", s.Name)
		}
		args = append(args, mount(w.secrets, s.Path)...)
	}
	return args
}

// inside is what the container prints: its environment, every file the
// plan mounts, and any client credential file it can find.
const inside = `echo ran-ok; env; echo ===files; for f in $(find /run/secrets -type f); do echo "$f: $(cat "$f")"; done; ` +
	`echo ===configs; find / -xdev \( -name config.json -o -name auth.json -o -name hosts.toml -o -name '*.dockercfg' \) 2>/dev/null; echo ===end`

// checkInside checks the container's own view.
func (w *e2eWorld) checkInside(out string) {
	w.t.Helper()
	for _, want := range []string{"ran-ok", "LOG_LEVEL=info", "APP_TOKEN=" + e2eRuntimeToken, "/run/secrets/app-keys/OPENAI_API_KEY: " + e2eRuntimeKey} {
		if !strings.Contains(out, want) {
			w.t.Errorf("the container lacks %q:\n%s", want, out)
		}
	}
	_, configs, _ := strings.Cut(out, "===configs")
	configs, _, _ = strings.Cut(configs, "===end")
	if strings.TrimSpace(configs) != "" {
		w.t.Errorf("client credential files inside the container:\n%s", configs)
	}
	w.noCanary("the container", out)
}

func canaryForms() []string {
	return []string{e2ePullCanary, base64.StdEncoding.EncodeToString([]byte("bot:" + e2ePullCanary)), base64.StdEncoding.EncodeToString([]byte(e2ePullCanary))}
}

func (w *e2eWorld) noCanary(what, s string) {
	w.t.Helper()
	for _, f := range canaryForms() {
		if strings.Contains(s, f) {
			w.t.Errorf("the pull credential is in %s:\n%s", what, s)
		}
	}
}

// finalCheck greps everything printed, and every file of the client
// environment, TMPDIR and the home (the sealed store holds only
// ciphertext), for the pull credential.
func (w *e2eWorld) finalCheck(logs ...string) {
	w.t.Helper()
	w.mu.Lock()
	out := strings.Join(w.output, "\n")
	w.mu.Unlock()
	w.noCanary("the output of pullsecret or a runtime", out)
	for i, l := range logs {
		w.noCanary(fmt.Sprintf("daemon log %d", i), l)
	}
	for _, root := range []string{w.env.Dir(), w.home, w.tmp} {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err != nil || fi.Size() > 8<<20 {
				return nil
			}
			b, err := os.ReadFile(path)
			if err == nil {
				for _, f := range canaryForms() {
					if strings.Contains(string(b), f) {
						w.t.Errorf("the pull credential is on disk in %s", path)
					}
				}
			}
			return nil
		})
	}
}

func e2eSkip(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real runtimes; not in -short")
	}
}

func TestE2ESpecPullDocker(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "dockerd", "docker", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newE2EWorld(t, "token")
	d := clients.StartDockerd(t, w.env)
	docker, _ := clients.LookPath("docker")
	p := w.specPull([]string{"DOCKER_HOST=" + d.Host, "PULLSECRET_DOCKER=" + docker}, "--runtime", "docker")

	args := []string{"run", "--name", "app", "--pull", "never", "--network", "none", "--ulimit", "nofile=1024:1024"}
	args = append(args, w.runtimeArgs(p, "-e", func(src, dst string) []string { return []string{"-v", src + ":" + dst + ":ro"} })...)
	args = append(args, p.Runtime.Image, "sh", "-c", inside)
	r, err := d.Docker(ctx, args...)
	w.record(r)
	if err != nil {
		t.Fatalf("docker run: %v\n%s", err, r.Output())
	}
	w.checkInside(r.Stdout)
	for _, a := range [][]string{{"inspect", "app"}, {"image", "inspect", p.Runtime.Image}} {
		r, err := d.Docker(ctx, a...)
		w.record(r)
		if err != nil {
			t.Fatalf("docker %s: %v", strings.Join(a, " "), err)
		}
		w.noCanary("docker "+strings.Join(a, " "), r.Stdout)
		if a[0] == "inspect" && !strings.Contains(r.Stdout, e2eRuntimeToken) {
			t.Errorf("docker inspect does not show the runtime environment the plan gave")
		}
	}
	if r, err := d.Docker(ctx, "rm", "app"); err != nil {
		t.Errorf("docker rm: %v %s", err, r.Output())
	}
	// Nothing of the pull stayed behind: a new pull with the node's own
	// configuration is turned away.
	if r, err := d.Docker(ctx, "rmi", p.Runtime.Image, w.ref); err != nil {
		t.Fatalf("docker rmi: %v %s", err, r.Output())
	}
	if r, err := d.Docker(ctx, "pull", w.ref); err == nil {
		t.Errorf("docker pull without spec pull succeeded: the credential stayed somewhere\n%s", r.Output())
	} else {
		w.record(r)
	}
	w.finalCheck(d.Logs())
}

func TestE2ESpecPullPodman(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "podman", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newE2EWorld(t, "htpasswd")
	pm := clients.NewPodman(t, w.env)
	p := w.specPull([]string{"CONTAINERS_CONF=" + pm.ConfFile, "CONTAINERS_STORAGE_CONF=" + pm.StorageConf}, "--runtime", "podman", "--insecure")

	flags := []string{"--name", "app", "--pull", "never"}
	flags = append(flags, w.runtimeArgs(p, "-e", func(src, dst string) []string { return []string{"-v", src + ":" + dst + ":ro"} })...)
	args := append([]string{"run", "--network", "none", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"}, flags...)
	args = append(args, p.Runtime.Image, "sh", "-c", inside)
	r, err := pm.Podman(ctx, args...)
	w.record(r)
	if err != nil {
		t.Fatalf("podman run: %v\n%s", err, r.Output())
	}
	w.checkInside(r.Stdout)
	for _, a := range [][]string{{"container", "inspect", "app"}, {"image", "inspect", p.Runtime.Image}} {
		r, err := pm.Podman(ctx, a...)
		w.record(r)
		if err != nil {
			t.Fatalf("podman %s: %v", strings.Join(a, " "), err)
		}
		w.noCanary("podman "+strings.Join(a, " "), r.Stdout)
	}
	if r, err := pm.Podman(ctx, "rm", "app"); err != nil {
		t.Errorf("podman rm: %v %s", err, r.Output())
	}
	w.finalCheck()
}

func TestE2ESpecPullContainerd(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "containerd", "ctr", "runc", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := newE2EWorld(t, "token")
	c := clients.StartContainerd(t)
	ctr, _ := clients.LookPath("ctr")
	p := w.specPull([]string{"CONTAINERD_ADDRESS=" + c.Address, "CONTAINERD_NAMESPACE=default", "CONTAINERD_SNAPSHOTTER=native", "PULLSECRET_CTR=" + ctr}, "--runtime", "containerd")

	r, err := c.Ctr(ctx, "images", "ls")
	w.record(r)
	if err != nil || !strings.Contains(r.Stdout, w.digest) {
		t.Fatalf("ctr images ls: %v\n%s", err, r.Output())
	}
	w.noCanary("ctr images ls", r.Stdout)
	// ctr names the image as pulled (by tag); the plan's digest is checked above.
	args := []string{"run", "--rm", "--snapshotter", "native"}
	args = append(args, w.runtimeArgs(p, "--env", func(src, dst string) []string {
		return []string{"--mount", "type=bind,src=" + src + ",dst=" + dst + ",options=rbind:ro"}
	})...)
	args = append(args, w.ref, "app", "sh", "-c", inside)
	r, err = c.Ctr(ctx, args...)
	w.record(r)
	if err != nil {
		t.Fatalf("ctr run: %v\n%s", err, r.Output())
	}
	w.checkInside(r.Stdout)
	w.finalCheck(c.Logs())
}

// TestE2ESpecPullOCILayout pulls into an OCI layout with
// go-containerregistry, in the pullsecret process itself.
func TestE2ESpecPullOCILayout(t *testing.T) {
	e2eSkip(t)
	t.Parallel()
	clients.Require(t, "busybox")
	w := newE2EWorld(t, "token")
	dir := filepath.Join(t.TempDir(), "layout")
	w.specPull(nil, "--runtime", "oci-layout:"+dir, "--insecure")
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil || !strings.Contains(string(b), w.digest) {
		t.Fatalf("layout index: %v %s", err, b)
	}
	w.finalCheck()
}
