package main

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/clients"
	"github.com/pullsecret/pullsecret/registry"
)

// crane and skopeo (and dockerd, where it can run) pull through the helper
// from a registry that takes ECR tokens, with an ecr secret made by the
// CLI. The registry is on 127.0.0.1 (a mirror of ECR, as a test cannot
// reach AWS), so the secret names its region; the token comes from the fake
// ECR API.
func TestE2EECRClients(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end with real clients; not in -short")
	}
	t.Parallel()
	clients.Require(t, "crane", "skopeo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := newECRWorld(t)
	reg, err := registry.StartECR(ctx, w.fake)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := clients.BusyboxImage()
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.SeedImage(ctx, "team/app", "v1", img); err != nil {
		t.Fatal(err)
	}
	ref := reg.Ref("team/app", "v1")

	// The clients get their own PATH and HOME; they pass ours on to the
	// helper they run.
	var extra []string
	for _, kv := range w.env {
		if strings.HasPrefix(kv, "PULLSECRET_") || strings.HasPrefix(kv, "AWS_") {
			extra = append(extra, kv)
		}
	}
	env := clients.NewEnv(t, clients.WithHelperDir(w.bin), clients.WithEnv(extra...))
	env.CredHelper(reg.Addr(), "pullsecret")
	var results []clients.Result
	pulls := map[string]func() (clients.Result, error){
		"crane": func() (clients.Result, error) {
			return env.Crane(ctx, "pull", "--insecure", "--format", "oci", ref, filepath.Join(t.TempDir(), "crane-out"))
		},
		"skopeo": func() (clients.Result, error) {
			return env.Skopeo(ctx, "copy", "--authfile", env.AuthFile(), "--src-tls-verify=false",
				"docker://"+ref, "dir:"+filepath.Join(t.TempDir(), "skopeo-out"))
		},
	}
	order := []string{"crane", "skopeo"}

	// No secret: the registry turns them away.
	for _, name := range order {
		r, err := pulls[name]()
		results = append(results, r)
		if err == nil || !strings.Contains(strings.ToLower(r.Output()), "unauthorized") && !strings.Contains(r.Output(), "401") {
			t.Fatalf("%s without a secret: %v\n%s", name, err, r.Output())
		}
	}

	r, err := env.Exec(ctx, clients.Command{
		Path: filepath.Join(w.bin, "pullsecret"),
		Args: []string{"secret", "create", "ecr-mirror", "--ecr", "--registry", reg.Addr(),
			"--aws-region", "us-east-1", "--aws-access-key-id", keyID, "--aws-secret-access-key-stdin"},
		Stdin: []byte(canaryKey + "\n"),
	})
	results = append(results, r)
	if err != nil {
		t.Fatalf("secret create: %v\n%s", err, r.Output())
	}
	for _, name := range order {
		r, err := pulls[name]()
		results = append(results, r)
		if err != nil {
			t.Fatalf("%s with the ecr secret: %v\n%s", name, err, r.Output())
		}
	}
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Fatalf("%d GetAuthorizationToken calls for two clients, want 1 (disk cache)", n)
	}

	// dockerd: docker pull calls the helper, then the container runs.
	t.Run("docker", func(t *testing.T) {
		d := clients.StartDockerd(t, env) // skips where dockerd cannot run
		r, err := d.Docker(ctx, "pull", ref)
		results = append(results, r)
		if err != nil {
			t.Fatalf("docker pull with the ecr secret: %v\n%s", err, r.Output())
		}
		r, err = d.RunContainer(ctx, ref, "sh", "-c", "echo ran-ok")
		results = append(results, r)
		if err != nil || !strings.Contains(r.Stdout, "ran-ok") {
			t.Fatalf("docker run: %v\n%s", err, r.Output())
		}
		for _, c := range append([]string{canaryKey}, w.fake.Issued()...) {
			if strings.Contains(d.Logs(), c) {
				t.Error("canary in dockerd's logs")
			}
		}
	})

	// Canaries: the AWS secret key and the ECR passwords appear in no
	// client output and in no file in the clear.
	canaries := append([]string{canaryKey}, w.fake.Issued()...)
	for _, r := range results {
		for _, c := range canaries {
			if strings.Contains(r.Output(), c) {
				t.Errorf("canary in the output of %s", r.Cmd)
			}
		}
	}
	for _, root := range []string{env.Dir(), w.home} {
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err != nil || fi.Size() > 8<<20 {
				return nil
			}
			b, _ := os.ReadFile(path)
			for _, c := range canaries {
				if strings.Contains(string(b), c) {
					t.Errorf("canary in the clear in %s", path)
				}
			}
			return nil
		})
	}
	w.checkCanaries()
}
