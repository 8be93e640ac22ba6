package credhelper_test

import (
	"context"
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
)

// The canary is the registry password in every end-to-end test here: it must
// show up nowhere but in the sealed store, as ciphertext.
const e2eCanary = "canary-e2e-pw-9b7f3e21"

// world is one registry, one pullsecret home and one client environment.
type world struct {
	t      *testing.T
	bin    string
	home   string
	reg    *registry.Registry
	env    *clients.Env
	ref    string
	output []clients.Result // everything the clients and our CLI printed
	mu     sync.Mutex
}

func newWorld(t *testing.T, auth string) *world {
	t.Helper()
	ctx := context.Background()
	w := &world{t: t, bin: testbin.Build(t, "pullsecret", "docker-credential-pullsecret"), home: filepath.Join(t.TempDir(), "home")}
	users := map[string]string{"bot": e2eCanary}
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
	if _, err := clients.Push(ctx, w.ref, img, remote.WithAuth(&authn.Basic{Username: "bot", Password: e2eCanary})); err != nil {
		t.Fatalf("push: %v", err)
	}
	w.env = clients.NewEnv(t, clients.WithHelperDir(w.bin), clients.WithEnv("PULLSECRET_HOME="+w.home))
	w.env.CredHelper(reg.Addr(), "pullsecret")
	return w
}

func (w *world) record(r clients.Result) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.output = append(w.output, r)
}

// pullsecret runs our CLI as an operator would.
func (w *world) pullsecret(stdin string, args ...string) clients.Result {
	w.t.Helper()
	c := clients.Command{Path: filepath.Join(w.bin, "pullsecret"), Args: args}
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

func (w *world) createSecret() {
	w.pullsecret(e2eCanary+"\n", "secret", "create", "e2e", "--registry", w.reg.Addr()+"/team", "--username", "bot", "--password-stdin")
}

// checkCanary greps every captured output and every file under the client
// environment and the pullsecret home (but the sealed store) for the canary.
func (w *world) checkCanary(extra ...string) {
	w.t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range w.output {
		if strings.Contains(r.Stdout, e2eCanary) || strings.Contains(r.Stderr, e2eCanary) {
			w.t.Errorf("canary in the output of %s", r.Cmd)
		}
	}
	for i, s := range extra {
		if strings.Contains(s, e2eCanary) {
			w.t.Errorf("canary in captured log %d", i)
		}
	}
	for _, root := range []string{w.env.Dir(), w.home} {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err != nil || fi.Size() > 8<<20 {
				return nil
			}
			b, err := os.ReadFile(path)
			if err == nil && strings.Contains(string(b), e2eCanary) {
				w.t.Errorf("canary in the clear in %s", path)
			}
			return nil
		})
	}
}

// pull runs one client's pull and reports the result.
type pullFunc func(ctx context.Context, w *world) (clients.Result, error)

func clientPulls(t *testing.T) map[string]pullFunc {
	return map[string]pullFunc{
		"crane": func(ctx context.Context, w *world) (clients.Result, error) {
			return w.env.Crane(ctx, "pull", "--format", "oci", w.ref, filepath.Join(t.TempDir(), "crane-out"))
		},
		"skopeo": func(ctx context.Context, w *world) (clients.Result, error) {
			return w.env.Skopeo(ctx, "copy", "--authfile", w.env.AuthFile(), "--src-tls-verify=false",
				"docker://"+w.ref, "dir:"+filepath.Join(t.TempDir(), "skopeo-out"))
		},
	}
}

func TestE2EClients(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real clients; not in -short")
	}
	for _, auth := range []string{"htpasswd", "token"} {
		t.Run(auth, func(t *testing.T) {
			t.Parallel()
			clients.Require(t, "crane", "skopeo", "podman", "dockerd", "docker")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			w := newWorld(t, auth)
			d := clients.StartDockerd(t, w.env)
			p := clients.NewPodman(t, w.env)
			pulls := clientPulls(t)
			pulls["podman"] = func(ctx context.Context, w *world) (clients.Result, error) {
				return p.Podman(ctx, "pull", "--tls-verify=false", w.ref)
			}
			pulls["docker"] = func(ctx context.Context, w *world) (clients.Result, error) {
				return d.Docker(ctx, "pull", w.ref)
			}
			order := []string{"crane", "skopeo", "podman", "docker"}

			// No secret yet: every client is turned away by the registry.
			expectDenied := func(stage string) {
				for _, name := range order {
					r, err := pulls[name](ctx, w)
					w.record(r)
					if err == nil {
						t.Errorf("%s %s: pull succeeded without a pull secret", stage, name)
						continue
					}
					if r.ExitCode == -1 {
						t.Errorf("%s %s: did not finish: %v", stage, name, err)
					}
					if !deniedText(r.Output()) {
						t.Errorf("%s %s: want the registry's 401, got:\n%s", stage, name, r.Output())
					}
				}
			}
			expectDenied("before create")

			w.createSecret()
			for _, name := range order {
				r, err := pulls[name](ctx, w)
				w.record(r)
				if err != nil {
					t.Fatalf("%s pull with the pull secret: %v\n%s", name, err, r.Output())
				}
			}
			// The container runs from the image pulled with the secret.
			r, err := d.RunContainer(ctx, w.ref, "sh", "-c", "echo ran-ok; env")
			w.record(r)
			if err != nil || !strings.Contains(r.Stdout, "ran-ok") {
				t.Fatalf("docker run: %v\n%s", err, r.Output())
			}
			// Removing the local copies, then the secret: pulls fail again.
			for _, rm := range []func() (clients.Result, error){
				func() (clients.Result, error) { return d.Docker(ctx, "rmi", "-f", w.ref) },
				func() (clients.Result, error) { return p.Podman(ctx, "rmi", "-f", w.ref) },
			} {
				r, err := rm()
				w.record(r)
				if err != nil {
					t.Fatalf("rmi: %v\n%s", err, r.Output())
				}
			}
			w.pullsecret("", "secret", "delete", "e2e")
			expectDenied("after delete")
			w.checkCanary(d.Logs())
		})
	}
}

func deniedText(out string) bool {
	out = strings.ToLower(out)
	for _, s := range []string{"401", "unauthorized", "authentication required", "denied", "no basic auth credentials"} {
		if strings.Contains(out, s) {
			return true
		}
	}
	return false
}

// TestE2EDockerLogin: `docker login` with credsStore pullsecret stores the
// secret in the sealed store, and the next pull uses it.
func TestE2EDockerLogin(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real clients; not in -short")
	}
	t.Parallel()
	clients.Require(t, "dockerd", "docker")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := newWorld(t, "htpasswd")
	w.env.CredsStore("pullsecret")
	d := clients.StartDockerd(t, w.env)
	r, err := d.DockerExec(ctx, w.env, clients.Command{Path: "/usr/bin/docker",
		Args: []string{"login", "--username", "bot", "--password-stdin", w.reg.Addr()}, Stdin: []byte(e2eCanary)})
	w.record(r)
	if err != nil {
		t.Fatalf("docker login: %v\n%s", err, r.Output())
	}
	list := w.pullsecret("", "secret", "list", "-o", "json")
	if !strings.Contains(list.Stdout, w.reg.Addr()) {
		t.Fatalf("docker login did not store a pull secret:\n%s", list.Stdout)
	}
	cfg, err := os.ReadFile(w.env.DockerConfigFile())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(cfg), `"auth"`) {
		t.Fatalf("docker wrote the credential into config.json instead of the helper:\n%s", cfg)
	}
	r, err = d.Docker(ctx, "pull", w.ref)
	w.record(r)
	if err != nil {
		t.Fatalf("docker pull after login: %v\n%s", err, r.Output())
	}
	r, err = d.Docker(ctx, "logout", w.reg.Addr())
	w.record(r)
	if err != nil {
		t.Fatalf("docker logout: %v\n%s", err, r.Output())
	}
	list = w.pullsecret("", "secret", "list", "-o", "json")
	if strings.Contains(list.Stdout, w.reg.Addr()) {
		t.Fatalf("docker logout left the pull secret:\n%s", list.Stdout)
	}
	w.checkCanary(d.Logs())
}
