package main

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

func TestImportFixtures(t *testing.T) {
	t.Parallel()
	type want struct {
		name, registry, resolve string
		kind                    secret.Kind
		user                    string // "" for tokens
	}
	k8s := []want{
		{"ghcr-io", "ghcr.io", "ghcr.io/acme/app", secret.Basic, "acme-bot"},
		{"registry-example-com-5000-team", "registry.example.com:5000/team", "registry.example.com:5000/team/app", secret.Basic, "team-bot"},
	}
	for _, tc := range []struct {
		file  string
		stdin bool
		want  []want
		notes []string
	}{
		{file: "k8s.dockerconfigjson", want: k8s},
		{file: "k8s-secret.json", want: k8s},
		{file: "k8s-secret.yaml", want: k8s},
		{file: "k8s-secret.yaml", stdin: true, want: k8s},
		{file: "config-auth.json", want: []want{
			{"docker-io", "docker.io", "docker.io/library/alpine", secret.Basic, "hubuser"},
			{"quay-io", "quay.io", "https://quay.io", secret.Basic, "quayuser"},
		}, notes: []string{
			`skipped desktop.example: no credential in this file (the credential store "desktop" keeps it)`,
			`skipped gcr.io: credentials are kept by the credential helper "gcloud"`,
		}},
		{file: "config-identitytoken.json", stdin: true, want: []want{
			{"myregistry-azurecr-io", "myregistry.azurecr.io", "myregistry.azurecr.io", secret.Token, ""},
			{"reg-example-org", "reg.example.org", "reg.example.org/x", secret.Token, ""},
		}},
	} {
		t.Run(tc.file+map[bool]string{true: " from stdin"}[tc.stdin], func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			args := []string{"secret", "import", "--from-dockerconfig", fixture(tc.file)}
			stdin := ""
			if tc.stdin {
				b, err := os.ReadFile(fixture(tc.file))
				if err != nil {
					t.Fatal(err)
				}
				stdin = string(b)
				args = []string{"secret", "import", "--from-dockerconfig=-"}
			}
			for round := 1; round <= 3; round++ {
				r := e.run(stdin, args...)
				if r.code != 0 {
					t.Fatalf("round %d: exit %d: %s", round, r.code, r.stderr)
				}
				lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
				if len(lines) != len(tc.want) {
					t.Fatalf("round %d: %d lines, want %d:\n%s", round, len(lines), len(tc.want), r.stdout)
				}
				state := "created"
				if round > 1 {
					state = "unchanged"
				}
				for i, w := range tc.want {
					line := "imported " + w.name + " for " + w.registry + " (" + string(w.kind) + ", version 1, " + state + ")"
					if lines[i] != line {
						t.Errorf("round %d: line %q, want %q", round, lines[i], line)
					}
				}
				for _, n := range tc.notes {
					if !strings.Contains(r.stderr, "pullsecret: note: "+n) {
						t.Errorf("round %d: no note %q in:\n%s", round, n, r.stderr)
					}
				}
				if len(tc.notes) == 0 && r.stderr != "" {
					t.Errorf("stderr: %s", r.stderr)
				}
			}
			list, err := e.store().List(context.Background(), "")
			if err != nil || len(list) != len(tc.want) {
				t.Fatalf("stored %v %v", list, err)
			}
			for _, w := range tc.want {
				s, v := e.value("default", w.resolve)
				if s.Name != w.name || s.Kind != w.kind || s.Version != 1 || len(s.Registries) != 1 || string(s.Registries[0]) != w.registry {
					t.Errorf("%s resolved to %+v", w.resolve, s)
				}
				switch w.kind {
				case secret.Basic:
					if v.Username != w.user || v.Password != canary || v.IdentityToken != "" {
						t.Errorf("%s: wrong value (user %q)", w.name, v.Username)
					}
				case secret.Token:
					if v.IdentityToken != canary || v.Password != "" || v.Username != "" {
						t.Errorf("%s: wrong token value", w.name)
					}
				}
			}
		})
	}
}

// writeConfig writes a Docker config for a test and returns its path.
func writeConfig(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func auth(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
}

func TestImportUpdatesAndNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// A secret the user made by hand for ghcr.io/acme takes the name
	// "ghcr-io"; an import for ghcr.io must not take it over.
	e.must(canary, "secret", "create", "ghcr-io", "--registry", "ghcr.io/acme", "--username", "u", "--password-stdin")
	// A hand-made secret claiming exactly quay.io is updated in place.
	e.must("old-"+canary, "secret", "create", "my-quay", "--registry", "quay.io", "--username", "old", "--password-stdin")

	cfg := writeConfig(t, `{"auths":{
		"ghcr.io": {"auth": "`+auth("bot", canary)+`"},
		"quay.io": {"username": "new", "password": "`+canary+`"},
		"reg.io/a-b": {"auth": "`+auth("x", canary)+`"},
		"reg.io/a/b": {"auth": "`+auth("y", canary)+`"}
	}}`)
	out := e.must("", "secret", "import", "--from-dockerconfig", cfg)
	want := []string{
		"imported ghcr-io-2 for ghcr.io (basic, version 1, created)",
		"imported my-quay for quay.io (basic, version 2, updated)",
		"imported reg-io-a-b for reg.io/a-b (basic, version 1, created)",
		"imported reg-io-a-b-2 for reg.io/a/b (basic, version 1, created)",
	}
	if got := strings.Split(strings.TrimSpace(out), "\n"); !slices.Equal(got, want) {
		t.Errorf("import:\n%s\nwant:\n%s", out, strings.Join(want, "\n"))
	}
	if _, v := e.value("default", "quay.io"); v.Username != "new" || v.Password != canary {
		t.Errorf("quay.io not updated (user %q)", v.Username)
	}
	if s, _ := e.value("default", "ghcr.io/acme/app"); s.Name != "ghcr-io" {
		t.Errorf("ghcr.io/acme resolved to %s", s.Name)
	}
	if s, _ := e.value("default", "ghcr.io/other/app"); s.Name != "ghcr-io-2" {
		t.Errorf("ghcr.io/other resolved to %s", s.Name)
	}
	// Again: the same secrets, nothing changes.
	out = e.must("", "secret", "import", "--from-dockerconfig", cfg)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if !strings.HasSuffix(l, "unchanged)") {
			t.Errorf("re-import: %s", l)
		}
	}
	// A changed password updates the secret and bumps its version.
	cfg2 := writeConfig(t, `{"auths":{"ghcr.io": {"auth": "`+auth("bot", "new-"+canary)+`"}}}`)
	out = e.must("", "secret", "import", "--from-dockerconfig", cfg2)
	if out != "imported ghcr-io-2 for ghcr.io (basic, version 2, updated)\n" {
		t.Errorf("changed import: %q", out)
	}
	if _, v := e.value("default", "ghcr.io/x"); v.Password != "new-"+canary {
		t.Error("changed password not imported")
	}
	// A kind change (password to identity token) is an update too.
	cfg3 := writeConfig(t, `{"auths":{"ghcr.io": {"identitytoken": "`+canary+`"}}}`)
	if out = e.must("", "secret", "import", "--from-dockerconfig", cfg3); out != "imported ghcr-io-2 for ghcr.io (token, version 3, updated)\n" {
		t.Errorf("kind change: %q", out)
	}
	// --project keeps imports apart.
	out = e.must("", "secret", "import", "--project", "p2", "--from-dockerconfig", cfg2)
	if out != "imported ghcr-io for ghcr.io (basic, version 1, created)\n" {
		t.Errorf("import into p2: %q", out)
	}
	// A registry covered by a multi-registry secret is refused, and nothing
	// of that import is written.
	e.must(canary, "secret", "create", "multi", "--project", "p3", "--registry", "a.io", "--registry", "b.io", "--username", "u", "--password-stdin")
	cfg4 := writeConfig(t, `{"auths":{"0.io": {"auth": "`+auth("u", canary)+`"}, "a.io": {"auth": "`+auth("u", canary)+`"}}}`)
	r := e.run("", "secret", "import", "--project", "p3", "--from-dockerconfig", cfg4)
	if r.code != 1 || !strings.Contains(r.stderr, "registry a.io is already covered by secret multi in project p3 together with b.io") {
		t.Errorf("multi-registry conflict: %d %s", r.code, r.stderr)
	}
	if l, _ := e.store().List(context.Background(), "p3"); len(l) != 1 {
		t.Errorf("a refused import wrote %v", l)
	}
}

func TestImportErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		content string // written to a file unless file is set
		file    string
		args    []string
		code    int
		err     string
	}{
		{name: "malformed fixture", file: fixture("malformed.json"), code: 1, err: "not valid JSON (syntax error at line 1"},
		{name: "missing file", file: filepath.Join(dir, "nope.json"), code: 1, err: "no such file"},
		{name: "folder", file: dir, code: 1, err: "is a folder"},
		{name: "empty", content: "", code: 1, err: "empty file"},
		{name: "only a credsStore", content: `{"auths":{"https://index.docker.io/v1/":{}},"credsStore":"desktop"}`, code: 1, err: "no registry credential to import"},
		{name: "empty object", content: `{}`, code: 1, err: "no registry credential to import"},
		{name: "truncated", content: `{"auths":{"r.io":{"password":"` + canary, code: 1, err: "not valid JSON"},
		{name: "syntax error at the password", content: `{"auths":{"r.io":{"username":"u","password":` + canary + `}}}`, code: 1, err: "syntax error at line 1, column 46"},
		{name: "password not a string", content: `{"auths":{"r.io":{"username":"u","password":12345678}}}`, code: 1, err: `registry "r.io": not a valid entry`},
		{name: "auth not base64", content: `{"auths":{"r.io":{"auth":"` + canary + `!"}}}`, code: 1, err: `the "auth" field is not valid base64`},
		{name: "auth without colon", content: `{"auths":{"r.io":{"auth":"` + base64.StdEncoding.EncodeToString([]byte(canary)) + `"}}}`, code: 1, err: `does not decode to "username:password"`},
		{name: "password without user", content: `{"auths":{"r.io":{"password":"` + canary + `"}}}`, code: 1, err: "a password without a username"},
		{name: "user without password", content: `{"auths":{"r.io":{"username":"u"}}}`, code: 1, err: "a username without a password"},
		{name: "bad registry key", content: `{"auths":{"bad host":{"username":"u","password":"` + canary + `"}}}`, code: 1, err: `registry "bad host"`},
		{name: "key with user info", content: `{"auths":{"https://u:` + canary + `@r.io":{"username":"u","password":"` + canary + `"}}}`, code: 1, err: "user info"},
		{name: "key equal to the password", content: `{"auths":{"bad ` + canary + `":{"username":"u","password":"` + canary + `"}}}`, code: 1, err: `registry "bad ***"`},
		{name: "conflicting aliases", content: `{"auths":{"docker.io":{"auth":"` + auth("a", canary) + `"},"https://index.docker.io/v1/":{"auth":"` + auth("b", canary) + `"}}}`, code: 1, err: "both name docker.io, with different credentials"},
		{name: "not a secret manifest", content: `{"apiVersion":"v1","kind":"ConfigMap","data":{"x":"` + canary + `"}}`, code: 1, err: `a Kubernetes "ConfigMap" manifest, not a Secret`},
		{name: "secret without docker data", content: "kind: Secret\ndata:\n  password: " + base64.StdEncoding.EncodeToString([]byte(canary)) + "\n", code: 1, err: "not a Docker config file"},
		{name: "secret data not base64", content: "kind: Secret\ndata:\n  .dockerconfigjson: " + canary + "!\n", code: 1, err: "data[.dockerconfigjson] is not valid base64"},
		{name: "random text", content: "hello " + canary + "\n", code: 1, err: "not a Docker config file"},
		{name: "binary", content: "\x00\x01\x02\xff" + canary, code: 1, err: "not a Docker config file"},
		{name: "no flag", args: []string{}, code: 2, err: "--from-dockerconfig FILE is required"},
		{name: "positional", args: []string{"config.json"}, code: 2, err: `unexpected argument "config.json"`},
		{name: "flag without value", args: []string{"--from-dockerconfig"}, code: 2, err: "needs a value"},
		{name: "bad project", content: `{"auths":{"r.io":{"auth":"` + auth("u", canary) + `"}}}`, args: []string{"--project", "P"}, code: 1, err: "project: invalid name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			args := []string{"secret", "import"}
			switch {
			case tc.file != "":
				args = append(args, "--from-dockerconfig", tc.file)
			case tc.args == nil || tc.name == "bad project":
				args = append(args, "--from-dockerconfig", writeConfig(t, tc.content))
			}
			args = append(args, tc.args...)
			r := e.run("", args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.err) {
				t.Fatalf("exit %d (want %d)\nstderr: %s\nwant ~ %q", r.code, tc.code, r.stderr, tc.err)
			}
			if r.stdout != "" {
				t.Errorf("stdout: %s", r.stdout)
			}
			if l, _ := e.store().List(context.Background(), ""); len(l) != 0 {
				t.Errorf("a failed import stored %v", l)
			}
		})
	}
}

func TestImportYAMLVariants(t *testing.T) {
	t.Parallel()
	inner := `{"auths":{"ghcr.io":{"auth":"` + auth("bot", canary) + `"}}}`
	b64 := base64.StdEncoding.EncodeToString([]byte(inner))
	for name, manifest := range map[string]string{
		"quoted base64":        "apiVersion: v1\nkind: Secret\ndata:\n  \".dockerconfigjson\": \"" + b64 + "\"\n",
		"single-quoted":        "kind: 'Secret'\ndata:\n    '.dockerconfigjson': '" + b64 + "'  # comment\n",
		"stringData block":     "kind: Secret\nmetadata:\n  name: x\nstringData:\n  .dockerconfigjson: |\n    " + inner + "\n  other: x\n",
		"stringData folded":    "kind: Secret\nstringData:\n  .dockerconfigjson: >-\n    {\"auths\":{\"ghcr.io\":\n    {\"auth\":\"" + auth("bot", canary) + "\"}}}\n",
		"CRLF and comments":    "# regcred\r\n---\r\napiVersion: v1\r\nkind: Secret\r\ndata:\r\n  # the config\r\n  .dockerconfigjson: " + b64 + "\r\ntype: kubernetes.io/dockerconfigjson\r\n",
		"wrapped base64":       "kind: Secret\ndata:\n  .dockerconfigjson:\n    " + b64[:20] + "\n    " + b64[20:] + "\n",
		"flow mapping":         "kind: Secret\ndata: {\".dockerconfigjson\": \"" + b64 + "\"}\n",
		"other docs first":     "kind: ConfigMap\ndata:\n  .dockerconfigjson: e30=\n---\nkind: Secret\ndata:\n  .dockerconfigjson: " + b64 + "\n",
		"dockercfg":            "kind: Secret\ntype: kubernetes.io/dockercfg\ndata:\n  .dockercfg: " + base64.StdEncoding.EncodeToString([]byte(`{"ghcr.io":{"auth":"`+auth("bot", canary)+`","email":"x@y"}}`)) + "\n",
		"stringData over data": "kind: Secret\ndata:\n  .dockerconfigjson: e30=\nstringData:\n  .dockerconfigjson: '" + inner + "'\n",
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			out := e.must("", "secret", "import", "--from-dockerconfig", writeConfig(t, manifest))
			if out != "imported ghcr-io for ghcr.io (basic, version 1, created)\n" {
				t.Fatalf("import: %q", out)
			}
			if _, v := e.value("default", "ghcr.io"); v.Username != "bot" || v.Password != canary {
				t.Errorf("wrong value (user %q)", v.Username)
			}
		})
	}
	e := newEnv(t)
	two := "kind: Secret\ndata:\n  .dockerconfigjson: " + b64 + "\n---\nkind: Secret\ndata:\n  .dockerconfigjson: " + b64 + "\n"
	if r := e.run("", "secret", "import", "--from-dockerconfig", writeConfig(t, two)); r.code != 1 || !regexp.MustCompile(`holds 2 Secrets`).MatchString(r.stderr) {
		t.Errorf("two secrets: %d %s", r.code, r.stderr)
	}
}
