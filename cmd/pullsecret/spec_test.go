package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files of testdata/specs/golden")

const specCanary = "canary-spec-cli-4e8b02"

const specsDir = "../../testdata/specs"

// specHome is a data folder with the pull secrets the example specs name,
// in project acme, and their canary values.
func specHome(t *testing.T) func(string) string {
	t.Helper()
	home := filepath.Join(t.TempDir(), "home")
	s, err := secret.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct{ name, reg string }{
		{"ghcr-acme", "ghcr.io/acme"},
		{"team-registry", "registry.example.com:5000/team"},
	} {
		p, err := secret.ParsePattern(x.reg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Create(context.Background(), secret.Secret{Project: "acme", Name: x.name, Kind: secret.Basic, Registries: []secret.Pattern{p}},
			secret.Value{Username: "bot", Password: specCanary}); err != nil {
			t.Fatal(err)
		}
	}
	return func(k string) string {
		switch k {
		case "PULLSECRET_HOME":
			return home
		case "PULLSECRET_PROJECT":
			return "acme"
		}
		return ""
	}
}

func specRun(t *testing.T, getenv func(string) string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(""), &out, &errb, getenv)
	for _, s := range []string{out.String(), errb.String()} {
		if strings.Contains(s, specCanary) {
			t.Errorf("pullsecret %q printed the pull secret's value:\n%s", args, s)
		}
		if strings.Contains(s, "panic") || strings.Contains(s, "internal error") {
			t.Errorf("pullsecret %q: %s", args, s)
		}
	}
	return code, out.String(), errb.String()
}

func specGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join(specsDir, "golden", name)
	if *updateGolden {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./cmd/pullsecret -run TestSpecPlanGolden -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file (go test ./cmd/pullsecret -run TestSpecPlanGolden -update rewrites it):\n got: %s\nwant: %s", name, got, want)
	}
}

// TestSpecPlanGolden prints every example spec's plans as JSON and compares
// them with testdata/specs/golden; invalid specs give their errors as JSON
// and exit 1.
func TestSpecPlanGolden(t *testing.T) {
	t.Parallel()
	getenv := specHome(t)
	for _, tc := range []struct {
		file  string
		args  []string
		code  int
		gold  string
		inErr []string
	}{
		{file: "github-agent.yaml", gold: "github-agent.json"},
		{file: "github-agent.yaml", args: []string{"--via", "proxy", "--server", "https://pullsecret.internal:5000"}, gold: "github-agent.proxy.json"},
		{file: "public.yaml", gold: "public.json"},
		{file: "pinned.yaml", gold: "pinned.json"},
		{file: "literal-credential.yaml", gold: "literal-credential.json",
			inErr: []string{"literal-credential.yaml:10:40: container.environment[1].value: the literal value of AWS_ACCESS_KEY_ID looks like a credential"}},
		{file: "invalid/pull-secret-as-runtime.yaml", code: 1, gold: "invalid-pull-secret-as-runtime.json", inErr: []string{
			`pull-secret-as-runtime.yaml:7:13: container.secrets[0]: "ghcr-acme" is an image pull secret of project acme`,
			`pull-secret-as-runtime.yaml:9:48: container.environment[0].secret.name: "ghcr-acme" is an image pull secret of project acme`,
			"pullsecret: ../../testdata/specs/invalid/pull-secret-as-runtime.yaml: 2 errors",
		}},
		{file: "invalid/unknown-secret.yaml", code: 1, gold: "invalid-unknown-secret.json", inErr: []string{
			`unknown-secret.yaml:6:16: container.pull_secret: pull secret "no-such-secret" does not exist in project acme (secret "ghcr-acme" of this project covers ghcr.io/acme/agent)`,
		}},
		{file: "invalid/wrong-registry.yaml", code: 1, gold: "invalid-wrong-registry.json", inErr: []string{
			`wrong-registry.yaml:6:16: container.pull_secret: pull secret "ghcr-acme" covers ghcr.io/acme, not the image's registry quay.io/acme/agent`,
		}},
		{file: "invalid/unknown-field.yaml", code: 1, gold: "invalid-unknown-field.json", inErr: []string{
			`unknown-field.yaml:6:3: container.pull_secrets: unknown field "pull_secrets" (did you mean "pull_secret"?)`,
		}},
		{file: "invalid/malformed.yaml", code: 1, gold: "invalid-malformed.json", inErr: []string{
			"malformed.yaml:3: malformed YAML: did not find expected ',' or '}'",
		}},
	} {
		t.Run(tc.gold, func(t *testing.T) {
			t.Parallel()
			args := append([]string{"spec", "plan", filepath.Join(specsDir, tc.file), "-o", "json"}, tc.args...)
			code, stdout, stderr := specRun(t, getenv, args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
			}
			if !json.Valid([]byte(stdout)) {
				t.Fatalf("stdout is not JSON: %s", stdout)
			}
			for _, s := range tc.inErr {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr)
				}
			}
			if len(tc.inErr) == 0 && stderr != "" {
				t.Errorf("unexpected stderr: %s", stderr)
			}
			specGolden(t, tc.gold, []byte(stdout))
		})
	}
}

func TestSpecPlanText(t *testing.T) {
	t.Parallel()
	getenv := specHome(t)
	code, out, stderr := specRun(t, getenv, "spec", "plan", filepath.Join(specsDir, "github-agent.yaml"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{
		"service github-agent (project acme",
		"pull secret  ghcr-acme (covers ghcr.io/acme)",
		"environment  LOG_LEVEL=info",
		"GITHUB_TOKEN from secret gh-room, key token",
		"openai-keys, mounted at /run/secrets/openai-keys",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("text plan lacks %q:\n%s", want, out)
		}
	}
	// The runtime part never names the pull secret.
	_, runtimePart, _ := strings.Cut(out, "runtime plan")
	if strings.Contains(runtimePart, "ghcr-acme") {
		t.Errorf("the runtime plan names the pull secret:\n%s", runtimePart)
	}
}

func TestSpecUsageErrors(t *testing.T) {
	t.Parallel()
	getenv := specHome(t)
	file := filepath.Join(specsDir, "github-agent.yaml")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"spec", "plan"}, 2, "missing spec FILE"},
		{[]string{"spec", "plan", file, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"spec", "plan", file, "-o", "yaml"}, 2, "unknown output format"},
		{[]string{"spec", "plan", file, "--via", "carrier-pigeon"}, 2, "--via"},
		{[]string{"spec", "plan", file, "--via", "proxy", "--server", "ftp://x"}, 2, "--server"},
		{[]string{"spec", "plan", "no-such-file.yaml"}, 1, "no-such-file.yaml"},
		{[]string{"spec", "plan", file, "--project", "nobody"}, 1, `pull secret "ghcr-acme" does not exist in project nobody`},
		{[]string{"spec", "pull", file, "--runtime", "rkt"}, 2, `runtime "rkt"`},
		{[]string{"spec", "pull", file, "--via", "proxy"}, 2, "--via proxy needs the server"},
		{[]string{"spec", "pull", file, "--via", "proxy", "--server", "http://127.0.0.1:1"}, 1, "needs a project pull token"},
	} {
		code, _, stderr := specRun(t, getenv, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("pullsecret %q: exit %d, stderr %q; want exit %d with %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
}
