package main

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

const cfgE2ECanary = "canary-configure-pw-81f3d2"

// TestE2EConfigureDockerPodman writes the Docker config.json and the
// containers auth.json with `pullsecret configure`, then pulls with the real
// clients using exactly those files: before, the registry turns them away.
func TestE2EConfigureDockerPodman(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real clients; not in -short")
	}
	t.Parallel()
	clients.Require(t, "dockerd", "docker", "podman", "busybox")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin := testbin.Build(t, "pullsecret", "docker-credential-pullsecret")
	reg, err := registry.Start(ctx, registry.WithTokenAuth(map[string]string{"bot": cfgE2ECanary}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Ref("team/app", "v1")
	if _, err := clients.Push(ctx, ref, img, remote.WithAuth(&authn.Basic{Username: "bot", Password: cfgE2ECanary})); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(t.TempDir(), "home")
	env := clients.NewEnv(t, clients.WithHelperDir(bin), clients.WithEnv("PULLSECRET_HOME="+home, "PULLSECRET_PROJECT=acme"))
	var outputs []string
	ps := func(stdin string, args ...string) {
		t.Helper()
		c := clients.Command{Path: filepath.Join(bin, "pullsecret"), Args: args}
		if stdin != "" {
			c.Stdin = []byte(stdin)
		}
		r, err := env.Exec(ctx, c)
		outputs = append(outputs, r.Output())
		if err != nil {
			t.Fatalf("pullsecret %s: %v\n%s", strings.Join(args, " "), err, r.Output())
		}
	}
	ps(cfgE2ECanary+"\n", "secret", "create", "team", "--registry", reg.Addr()+"/team", "--username", "bot", "--password-stdin")

	d := clients.StartDockerd(t, env)
	pm := clients.NewPodman(t, env)
	pulls := map[string]func() (clients.Result, error){
		"docker": func() (clients.Result, error) { return d.Docker(ctx, "pull", ref) },
		"podman": func() (clients.Result, error) { return pm.Podman(ctx, "pull", "--tls-verify=false", ref) },
	}
	for name, pull := range pulls {
		if r, err := pull(); err == nil {
			t.Fatalf("%s pulled before configure: the test proves nothing\n%s", name, r.Output())
		}
	}
	ps("", "configure", "docker", "--config", env.DockerConfigFile(), "--registry", reg.Addr())
	ps("", "configure", "podman", "--auth-file", env.AuthFile(), "--registry", reg.Addr())
	for name, pull := range pulls {
		r, err := pull()
		outputs = append(outputs, r.Output())
		if err != nil {
			t.Fatalf("%s pull with the configured helper: %v\n%s", name, err, r.Output())
		}
	}
	// The credential went through the helper: neither file holds it.
	for _, f := range []string{env.DockerConfigFile(), env.AuthFile()} {
		outputs = append(outputs, readFileString(t, f))
	}
	for _, o := range append(outputs, d.Logs()) {
		for _, c := range []string{cfgE2ECanary, base64.StdEncoding.EncodeToString([]byte("bot:" + cfgE2ECanary))} {
			if strings.Contains(o, c) {
				t.Errorf("the credential leaked:\n%s", o)
			}
		}
	}
}

func readFileString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
