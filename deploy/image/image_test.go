package image_test

// The image of deploy/image, built as `make image` builds it (stage.sh, then
// `podman build`), and run as deploy/kubernetes runs it: UID 65532, a
// read-only root file system (no tmpfs on /tmp either), the data folder on
// a volume, the config mounted read-only. It must serve a verified pull and stop gracefully on
// SIGTERM, its log holding no credential.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

const canary = "canary-image-pw-3f9a"

func TestImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a container image and runs it with podman")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p := clients.NewPodman(t, clients.NewEnv(t))
	bin := testbin.Build(t)

	// Build it as `make image` does.
	here, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	buildCtx := t.TempDir()
	if out, err := exec.CommandContext(ctx, "sh", filepath.Join(here, "stage.sh"), bin, buildCtx).CombinedOutput(); err != nil {
		t.Fatalf("stage.sh: %v\n%s", err, out)
	}
	const tag = "localhost/pullsecret:image-test"
	if r, err := p.Podman(ctx, "build", "-f", filepath.Join(here, "Containerfile"), "-t", tag, buildCtx); err != nil || r.ExitCode != 0 {
		t.Fatalf("podman build: %v\n%s", err, r.Output())
	}
	inspect := func(format string) string {
		t.Helper()
		r, err := p.Podman(ctx, "image", "inspect", "--format", format, tag)
		if err != nil || r.ExitCode != 0 {
			t.Fatalf("podman image inspect: %v\n%s", err, r.Output())
		}
		return strings.TrimSpace(r.Stdout)
	}
	if u := inspect("{{.Config.User}}"); u != "65532:65532" {
		t.Errorf("image user %q, want 65532:65532 (not root)", u)
	}
	if ep := inspect("{{.Config.Entrypoint}}"); !strings.Contains(ep, "/usr/local/bin/pullsecret") {
		t.Errorf("entrypoint %s", ep)
	}
	// The roots upstream HTTPS needs, and a data folder the user owns.
	if r, err := p.Podman(ctx, "image", "mount", tag); err != nil || r.ExitCode != 0 {
		t.Fatalf("podman image mount: %v\n%s", err, r.Output())
	} else {
		root := strings.TrimSpace(r.Stdout)
		if fi, err := os.Stat(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt")); err != nil || fi.Size() == 0 {
			t.Errorf("CA bundle in the image: %v", err)
		}
		if fi, err := os.Stat(filepath.Join(root, "var/lib/pullsecret")); err != nil || !fi.IsDir() || fi.Sys().(*syscall.Stat_t).Uid != 65532 {
			t.Errorf("data folder in the image: %v %v", fi, err)
		}
		_, _ = p.Podman(ctx, "image", "unmount", tag)
	}

	// An upstream on the host, and a data folder made by the host's CLI
	// with a pull secret and a token, handed to the container's user.
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": canary}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	d, err := up.SeedBlob(ctx, "team/app", 4<<20, registry.RandSeed(9))
	if err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(t.TempDir(), "home")
	cli := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "pullsecret"), args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "PULLSECRET_HOME=" + home}
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("pullsecret %s: %v", strings.Join(args, " "), err)
		}
		return string(out)
	}
	cli(canary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(cli("", "token", "create", "--project", "acme", "--scope", "pull"))
	chownAll(t, home, 65532)

	host := fmt.Sprintf("127.0.0.1:%d", testbin.FreePort(t))
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	config := fmt.Sprintf("listen: %s\nallow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\nshutdown_delay: 1s\n", host, up.Host())
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := p.Podman(ctx, "run", "-d", "--name", "pullsecret", "--runtime", "runc",
		"--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "host", "--read-only", "--read-only-tmpfs=false",
		"-v", home+":/var/lib/pullsecret", "-v", cfg+":/etc/pullsecret/config.yaml:ro",
		tag, "serve", "--config", "/etc/pullsecret/config.yaml")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("podman run: %v\n%s", err, r.Output())
	}
	logs := func() string {
		r, _ := p.Podman(context.Background(), "logs", "pullsecret")
		return r.Output()
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		resp, err := http.Get("http://" + host + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container's serve not ready after 60s:\n%s", logs())
		}
	}

	// A pull through it, verified.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v2/up/team/app/blobs/"+d.String(), nil)
	req.SetBasicAuth("ci", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || "sha256:"+hex.EncodeToString(h.Sum(nil)) != d.String() {
		t.Fatalf("pull through the container: status %d, %d bytes, %v\n%s", resp.StatusCode, n, err, logs())
	}

	// SIGTERM, as the kubelet sends it: a clean exit after the delay.
	if r, err := p.Podman(ctx, "stop", "-t", "20", "pullsecret"); err != nil || r.ExitCode != 0 {
		t.Fatalf("podman stop: %v\n%s", err, r.Output())
	}
	if r, err := p.Podman(ctx, "inspect", "--format", "{{.State.ExitCode}}", "pullsecret"); err != nil || strings.TrimSpace(r.Stdout) != "0" {
		t.Errorf("exit code %q (%v) after SIGTERM:\n%s", r.Stdout, err, logs())
	}
	out := logs()
	if !strings.Contains(out, "shutting down") {
		t.Errorf("no graceful shutdown in the log:\n%s", out)
	}
	for _, s := range []string{canary, tok} {
		if strings.Contains(out, s) {
			t.Errorf("the container's log holds a credential (%.10s...)", s)
		}
	}
}

// chownAll gives dir and everything in it to uid (and the same gid), as
// fsGroup does for a pod's volume.
func chownAll(t *testing.T, dir string, uid int) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, uid)
	})
	if err != nil {
		t.Fatal(err)
	}
}
