package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

func fixture(name string) string {
	return filepath.Join("..", "..", "testdata", "dockerconfig", name)
}

func TestCreate(t *testing.T) {
	t.Parallel()
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte(canary+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		code  int
		err   string // substring of stderr
		// on success: registry to resolve and the value expected there
		reg, user, pass, token string
		project                string
	}{
		{name: "name first", stdin: canary + "\n", args: []string{"ghcr", "--registry", "ghcr.io/acme", "--username", "bot", "--password-stdin"},
			reg: "ghcr.io/acme/app", user: "bot", pass: canary},
		{name: "flags first", stdin: canary, args: []string{"--registry", "ghcr.io/acme", "--username", "bot", "--password-stdin", "ghcr"},
			reg: "ghcr.io/acme", user: "bot", pass: canary},
		{name: "name between flags, --flag=value", stdin: canary + "\r\n", args: []string{"--registry=ghcr.io/acme", "ghcr", "--username=bot", "--password-stdin=true"},
			reg: "ghcr.io/acme", user: "bot", pass: canary},
		{name: "single dash flags", stdin: canary, args: []string{"ghcr", "-registry", "ghcr.io", "-username", "bot", "-password-stdin"},
			reg: "ghcr.io", user: "bot", pass: canary},
		{name: "several registries", stdin: canary, args: []string{"multi", "--registry", "a.example", "--registry", "https://index.docker.io/v1/", "--username", "bot", "--password-stdin"},
			reg: "docker.io", user: "bot", pass: canary},
		{name: "token", stdin: canary + "\n", args: []string{"tok", "--registry", "reg.example:5000", "--token-stdin"},
			reg: "reg.example:5000", token: canary},
		{name: "token flags first", stdin: canary, args: []string{"--token-stdin", "--registry", "reg.example:5000", "tok"},
			reg: "reg.example:5000", token: canary},
		{name: "password file", args: []string{"f", "--registry", "f.example", "--username", "bot", "--password-file", pwFile},
			reg: "f.example", user: "bot", pass: canary},
		{name: "token file", args: []string{"f", "--registry", "f.example", "--token-file=" + pwFile},
			reg: "f.example", token: canary},
		{name: "project flag", stdin: canary, args: []string{"p", "--project", "team-a", "--registry", "p.example", "--username", "u", "--password-stdin"},
			reg: "p.example", user: "u", pass: canary, project: "team-a"},
		{name: "-- ends flags", stdin: canary, args: []string{"--registry", "p.example", "--username", "u", "--password-stdin", "--", "p"},
			reg: "p.example", user: "u", pass: canary},

		{name: "bad name", stdin: canary, args: []string{"Bad_Name", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: `invalid name "Bad_Name"`},
		{name: "bad name with dot", stdin: canary, args: []string{"a.b", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: "invalid name"},
		{name: "bad project", stdin: canary, args: []string{"x", "--project", "Team", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: "project: invalid name"},
		{name: "bad registry", stdin: canary, args: []string{"x", "--registry", "bad host", "--username", "u", "--password-stdin"}, code: 1, err: "--registry"},
		{name: "bad registry scheme", stdin: canary, args: []string{"x", "--registry", "ftp://r.io", "--username", "u", "--password-stdin"}, code: 1, err: "scheme"},
		{name: "bad registry port", stdin: canary, args: []string{"x", "--registry", "r.io:99999", "--username", "u", "--password-stdin"}, code: 1, err: "invalid port"},
		{name: "registry with user info", stdin: canary, args: []string{"x", "--registry", "https://u:" + canary + "@r.io", "--username", "u", "--password-stdin"}, code: 1, err: "user info"},
		{name: "registry twice", stdin: canary, args: []string{"x", "--registry", "docker.io", "--registry", "index.docker.io", "--username", "u", "--password-stdin"}, code: 1, err: "given twice"},
		{name: "username with colon", stdin: canary, args: []string{"x", "--registry", "r.io", "--username", "a:b", "--password-stdin"}, code: 1, err: "--username"},
		{name: "empty stdin", stdin: "", args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: "no password on standard input"},
		{name: "newline only", stdin: "\n", args: []string{"x", "--registry", "r.io", "--token-stdin"}, code: 1, err: "no token on standard input"},
		{name: "two lines", stdin: canary + "\n" + canary + "\n", args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: "more than one line"},
		{name: "control character", stdin: canary + "\x00", args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 1, err: "control characters"},
		{name: "missing file", args: []string{"x", "--registry", "r.io", "--username", "u", "--password-file", "/nonexistent/pw"}, code: 1, err: "no such file"},

		{name: "missing name", stdin: canary, args: []string{"--registry", "r.io", "--username", "u", "--password-stdin"}, code: 2, err: "missing NAME"},
		{name: "two names", stdin: canary, args: []string{"a", "b", "--registry", "r.io", "--username", "u", "--password-stdin"}, code: 2, err: `unexpected argument "b"`},
		{name: "missing registry", stdin: canary, args: []string{"x", "--username", "u", "--password-stdin"}, code: 2, err: "--registry is required"},
		{name: "missing username", stdin: canary, args: []string{"x", "--registry", "r.io", "--password-stdin"}, code: 2, err: "--username is required"},
		{name: "missing value flag", stdin: canary, args: []string{"x", "--registry", "r.io", "--username", "u"}, code: 2, err: "--password-stdin or --token-stdin"},
		{name: "both value flags", stdin: canary, args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin", "--token-stdin"}, code: 2, err: "cannot be used together"},
		{name: "username with token", stdin: canary, args: []string{"x", "--registry", "r.io", "--username", "u", "--token-stdin"}, code: 2, err: "--username goes with a password"},
		{name: "password on argv", args: []string{"x", "--registry", "r.io", "--username", "u", "--password", canary}, code: 2, err: "use --password-stdin"},
		{name: "password flag with =", args: []string{"x", "--registry", "r.io", "--username", "u", "--password=" + canary}, code: 2, err: "unknown flag --password"},
		{name: "value given to a switch", args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin=" + canary}, code: 2, err: "--password-stdin takes no value"},
		{name: "token on argv", args: []string{"x", "--registry", "r.io", "--token", canary}, code: 2, err: "use --token-stdin"},
		{name: "unknown flag", stdin: canary, args: []string{"x", "--registry", "r.io", "--username", "u", "--password-stdin", "--bogus"}, code: 2, err: "unknown flag --bogus"},
		{name: "flag without value", stdin: canary, args: []string{"x", "--username", "u", "--password-stdin", "--registry"}, code: 2, err: "flag --registry needs a value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			r := e.run(tc.stdin, append([]string{"secret", "create"}, tc.args...)...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.err) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s\nwant stderr ~ %q", r.code, tc.code, r.stdout, r.stderr, tc.err)
			}
			if tc.code != 0 {
				if _, err := os.Stat(filepath.Join(e.home, "secrets.json")); err == nil {
					if l, _ := e.store().List(context.Background(), ""); len(l) != 0 {
						t.Errorf("a failed create stored %v", l)
					}
				}
				return
			}
			if !strings.HasPrefix(r.stdout, "created secret ") {
				t.Errorf("stdout %q", r.stdout)
			}
			project := tc.project
			if project == "" {
				project = "default"
			}
			s, v := e.value(project, tc.reg)
			if v.Username != tc.user || v.Password != tc.pass || v.IdentityToken != tc.token {
				t.Errorf("%s resolved to the wrong value (user %q)", tc.reg, v.Username)
			}
			if s.Version != 1 || s.Project != project {
				t.Errorf("stored %+v", s)
			}
		})
	}
}

func TestCreateConflicts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.must(canary, "secret", "create", "ghcr", "--registry", "ghcr.io/acme", "--username", "u", "--password-stdin")
	r := e.run(canary, "secret", "create", "ghcr", "--registry", "ghcr.io/other", "--username", "u", "--password-stdin")
	if r.code != 1 || !strings.Contains(r.stderr, "already exists") || !strings.Contains(r.stderr, "secret rotate ghcr") {
		t.Errorf("duplicate name: %d %s", r.code, r.stderr)
	}
	r = e.run(canary, "secret", "create", "other", "--registry", "ghcr.io/acme", "--username", "u", "--password-stdin")
	if r.code != 1 || !strings.Contains(r.stderr, "already covered by secret ghcr") {
		t.Errorf("duplicate registry: %d %s", r.code, r.stderr)
	}
	// The same name in another project is a different secret.
	e.must(canary, "secret", "create", "ghcr", "--project", "p2", "--registry", "ghcr.io/acme", "--username", "u", "--password-stdin")
	// PULLSECRET_PROJECT selects the default project.
	e.vars["PULLSECRET_PROJECT"] = "p3"
	e.must(canary, "secret", "create", "ghcr", "--registry", "ghcr.io/acme", "--username", "u", "--password-stdin")
	out := e.must("", "secret", "list", "--all-projects")
	for _, p := range []string{"default", "p2", "p3"} {
		if !regexp.MustCompile(`(?m)^` + p + `\s+ghcr\s+basic\s+ghcr.io/acme\s+1\s`).MatchString(out) {
			t.Errorf("project %s missing from:\n%s", p, out)
		}
	}
}

// TestFlagOrders runs every command with its NAME before, between and after
// the flags, with both --flag value and --flag=value.
func TestFlagOrders(t *testing.T) {
	t.Parallel()
	for _, order := range []string{"name-first", "name-last", "name-middle", "equals"} {
		t.Run(order, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			arrange := func(cmd []string, name string, flags ...string) []string {
				switch order {
				case "name-first":
					return append(append(cmd, name), flags...)
				case "name-last":
					return append(append(cmd, flags...), name)
				case "name-middle":
					return append(append(append(cmd, flags[:2]...), name), flags[2:]...)
				}
				// --flag=value for every flag that takes a value.
				var out []string
				for i := 0; i < len(flags); i++ {
					if i+1 < len(flags) && !strings.HasPrefix(flags[i+1], "--") && !strings.HasSuffix(flags[i], "-stdin") {
						out = append(out, flags[i]+"="+flags[i+1])
						i++
						continue
					}
					out = append(out, flags[i])
				}
				return append(append(cmd, out...), name)
			}
			e.must(canary, arrange([]string{"secret", "create"}, "app", "--project", "team", "--registry", "r.example/app", "--username", "bot", "--password-stdin")...)
			out := e.must("", arrange([]string{"secret", "show"}, "app", "--project", "team", "-o", "json")...)
			var s secret.Secret
			if err := json.Unmarshal([]byte(out), &s); err != nil || s.Name != "app" || s.Project != "team" {
				t.Fatalf("show: %v %+v\n%s", err, s, out)
			}
			e.must("new-"+canary, arrange([]string{"secret", "rotate"}, "app", "--project", "team", "--username", "bot2", "--password-stdin")...)
			if _, v := e.value("team", "r.example/app"); v.Username != "bot2" || v.Password != "new-"+canary {
				t.Errorf("rotate did not change the value (user %q)", v.Username)
			}
			e.must("", arrange([]string{"secret", "delete"}, "app", "--project", "team", "--home", e.home)...)
			if l, _ := e.store().List(context.Background(), ""); len(l) != 0 {
				t.Errorf("left %v", l)
			}
		})
	}
}

func TestListAndShow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// Nothing yet: a header, and an empty JSON list.
	if out := e.must("", "secret", "list"); strings.TrimSpace(out) != "NAME  KIND  REGISTRIES  VERSION  UPDATED" {
		t.Errorf("empty list: %q", out)
	}
	if out := e.must("", "secret", "list", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("empty json list: %q", out)
	}
	e.must(canary, "secret", "create", "ghcr", "--registry", "ghcr.io/acme", "--registry", "ghcr.io/beta", "--username", "acme-user-7", "--password-stdin")
	e.must(canary, "secret", "create", "tok", "--registry", "127.0.0.1:5000", "--token-stdin")
	e.must(canary, "secret", "create", "other", "--project", "p2", "--registry", "ghcr.io/acme", "--username", "acme-user-7", "--password-stdin")

	out := e.must("", "secret", "list")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !regexp.MustCompile(`^NAME\s+KIND\s+REGISTRIES\s+VERSION\s+UPDATED$`).MatchString(lines[0]) ||
		!regexp.MustCompile(`^ghcr\s+basic\s+ghcr.io/acme,ghcr.io/beta\s+1\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`).MatchString(lines[1]) ||
		!regexp.MustCompile(`^tok\s+token\s+127.0.0.1:5000\s+1\s`).MatchString(lines[2]) {
		t.Errorf("list:\n%s", out)
	}
	for _, args := range [][]string{{"-o", "json"}, {"--output=json"}, {"-o=json"}} {
		out = e.must("", append([]string{"secret", "list"}, args...)...)
		var list []secret.Secret
		if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 2 || list[0].Name != "ghcr" || list[1].Kind != secret.Token {
			t.Errorf("list %q: %v\n%s", args, err, out)
		}
	}
	out = e.must("", "secret", "list", "--project", "p2")
	if !strings.Contains(out, "other") || strings.Contains(out, "ghcr  ") {
		t.Errorf("list --project p2:\n%s", out)
	}
	out = e.must("", "secret", "list", "--all-projects", "-o", "json")
	var all []secret.Secret
	if err := json.Unmarshal([]byte(out), &all); err != nil || len(all) != 3 {
		t.Errorf("--all-projects: %v\n%s", err, out)
	}
	if r := e.run("", "secret", "list", "--all-projects", "--project", "p2"); r.code != 2 {
		t.Errorf("--all-projects with --project: %d", r.code)
	}
	if r := e.run("", "secret", "list", "extra"); r.code != 2 {
		t.Errorf("list extra: %d", r.code)
	}

	out = e.must("", "secret", "show", "ghcr")
	for _, want := range []string{"Name:", "ghcr", "Kind:", "basic", "Registries:", "ghcr.io/acme,ghcr.io/beta", "Version:", "1", "Updated:"} {
		if !strings.Contains(out, want) {
			t.Errorf("show lacks %q:\n%s", want, out)
		}
	}
	for _, args := range [][]string{{"ghcr"}, {"ghcr", "-o", "json"}, {"-o", "table", "ghcr"}, {"--project=p2", "other"}, {"tok", "--output", "json"}} {
		out = e.must("", append([]string{"secret", "show"}, args...)...)
		// Metadata only: never the value, never the user name.
		if strings.Contains(out, "acme-user-7") || strings.Contains(strings.ToLower(out), "password") || strings.Contains(strings.ToLower(out), "username") {
			t.Errorf("show %q prints more than metadata:\n%s", args, out)
		}
	}
	out = e.must("", "secret", "list", "--all-projects")
	if strings.Contains(out, "acme-user-7") {
		t.Errorf("list prints the user name:\n%s", out)
	}
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{[]string{"missing"}, 1, "not found"},
		{[]string{"ghcr", "--project", "p2"}, 1, "not found"},
		{[]string{"Bad_Name"}, 1, "invalid name"},
		{[]string{}, 2, "missing NAME"},
		{[]string{"a", "b"}, 2, "unexpected argument"},
		{[]string{"ghcr", "-o", "yaml"}, 2, "unknown output format"},
	} {
		r := e.run("", append([]string{"secret", "show"}, tc.args...)...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.err) {
			t.Errorf("show %q: %d %s", tc.args, r.code, r.stderr)
		}
	}
}

func TestRotate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.must("old-"+canary, "secret", "create", "basic", "--registry", "b.example", "--username", "bot", "--password-stdin")
	e.must("old-"+canary, "secret", "create", "tok", "--registry", "t.example", "--token-stdin")

	out := e.must(canary+"\n", "secret", "rotate", "basic", "--password-stdin")
	if out != "rotated secret basic (version 2, project default)\n" {
		t.Errorf("rotate printed %q", out)
	}
	if s, v := e.value("default", "b.example"); v.Username != "bot" || v.Password != canary || s.Version != 2 {
		t.Errorf("after rotate: version %d user %q", s.Version, v.Username)
	}
	e.must(canary, "secret", "rotate", "--username", "bot2", "--password-stdin", "basic")
	if _, v := e.value("default", "b.example"); v.Username != "bot2" || v.Password != canary {
		t.Errorf("after rotate --username: user %q", v.Username)
	}
	e.must(canary, "secret", "rotate", "--token-stdin", "tok")
	if s, v := e.value("default", "t.example"); v.IdentityToken != canary || s.Version != 2 || s.Kind != secret.Token {
		t.Errorf("token rotate: %+v", s)
	}

	for _, tc := range []struct {
		stdin string
		args  []string
		code  int
		err   string
	}{
		{canary, []string{"basic", "--token-stdin"}, 1, "basic secret: rotate it with --password-stdin"},
		{canary, []string{"tok", "--password-stdin"}, 1, "token secret: rotate it with --token-stdin"},
		{canary, []string{"missing", "--password-stdin"}, 1, "not found"},
		{"", []string{"basic", "--password-stdin"}, 1, "no password on standard input"},
		{"\n", []string{"tok", "--token-stdin"}, 1, "no token"},
		{canary, []string{"Bad_Name", "--password-stdin"}, 1, "invalid name"},
		{canary, []string{"basic"}, 2, "--password-stdin or --token-stdin"},
		{canary, []string{"basic", "--password-stdin", "--token-stdin"}, 2, "cannot be used together"},
		{canary, []string{"tok", "--token-stdin", "--username", "x"}, 2, "--username goes with a password"},
		{canary, []string{"--password-stdin"}, 2, "missing NAME"},
		{canary, []string{"basic", "--password", canary}, 2, "use --password-stdin"},
		{canary, []string{"basic", "--registry", "x.io", "--password-stdin"}, 2, "unknown flag --registry"},
	} {
		r := e.run(tc.stdin, append([]string{"secret", "rotate"}, tc.args...)...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.err) {
			t.Errorf("rotate %q: %d %s", tc.args, r.code, r.stderr)
		}
	}
	// Failed rotations changed nothing.
	if s, v := e.value("default", "b.example"); s.Version != 3 || v.Password != canary {
		t.Errorf("a failed rotate changed the secret: version %d", s.Version)
	}
}

func TestDelete(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.must(canary, "secret", "create", "a", "--registry", "a.example", "--username", "u", "--password-stdin")
	e.must(canary, "secret", "create", "a", "--project", "p2", "--registry", "a.example", "--username", "u", "--password-stdin")
	if out := e.must("", "secret", "delete", "a"); out != "deleted secret a (project default)\n" {
		t.Errorf("delete printed %q", out)
	}
	if r := e.run("", "secret", "delete", "a"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("second delete: %d %s", r.code, r.stderr)
	}
	if l, _ := e.store().List(context.Background(), ""); len(l) != 1 || l[0].Project != "p2" {
		t.Errorf("left %v", l)
	}
	e.must("", "secret", "delete", "--project", "p2", "a")
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{}, 2}, {[]string{"a", "b"}, 2}, {[]string{"Bad_Name"}, 1}, {[]string{"a", "--force"}, 2},
	} {
		if r := e.run("", append([]string{"secret", "delete"}, tc.args...)...); r.code != tc.code {
			t.Errorf("delete %q: %d %s", tc.args, r.code, r.stderr)
		}
	}
}

func TestKeyRotate(t *testing.T) {
	t.Parallel()
	for _, customKey := range []bool{false, true} {
		t.Run(map[bool]string{false: "home key", true: "PULLSECRET_KEY_FILE"}[customKey], func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			keyPath := filepath.Join(e.home, "key")
			if customKey {
				keyPath = filepath.Join(t.TempDir(), "keys", "pullsecret.key")
				e.vars["PULLSECRET_KEY_FILE"] = keyPath
			}
			e.must(canary, "secret", "create", "a", "--registry", "a.example", "--username", "u", "--password-stdin")
			e.must(canary, "secret", "create", "t", "--project", "p2", "--registry", "t.example/team", "--token-stdin")
			e.must("", "secret", "import", "--from-dockerconfig", fixture("config-auth.json"))
			before, err := secret.LoadKeyring(keyPath)
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{before.Current: true}
			for range 2 {
				out := e.must("", "key", "rotate")
				id := strings.TrimSpace(out)
				if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(id) || seen[id] {
					t.Fatalf("key rotate printed %q", out)
				}
				seen[id] = true
				k, err := secret.LoadKeyring(keyPath)
				if err != nil {
					t.Fatal(err)
				}
				if k.Current != id || len(k.Keys) != 1 {
					t.Errorf("keyring after rotate: current %s, %d keys; printed %s", k.Current, len(k.Keys), id)
				}
				// Every value still resolves, under the new key.
				if _, v := e.value("default", "a.example"); v.Password != canary || v.Username != "u" {
					t.Error("a.example no longer resolves")
				}
				if _, v := e.value("p2", "t.example/team/app"); v.IdentityToken != canary {
					t.Error("t.example no longer resolves")
				}
				if _, v := e.value("default", "https://index.docker.io/v1/"); v.Password != canary || v.Username != "hubuser" {
					t.Error("docker.io no longer resolves")
				}
				b, err := os.ReadFile(filepath.Join(e.home, "secrets.json"))
				if err != nil {
					t.Fatal(err)
				}
				if n := strings.Count(string(b), `"key_id":"`+id+`"`); n != 4 {
					t.Errorf("%d records sealed under the new key, want 4:\n%s", n, b)
				}
			}
		})
	}
}

func TestNoCanaryAnywhere(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.must(canary+"\n", "secret", "create", "ghcr", "--registry", "ghcr.io/acme", "--username", "bot", "--password-stdin")
	e.must(canary, "secret", "create", "tok", "--registry", "t.example", "--token-stdin")
	for _, f := range []string{"k8s.dockerconfigjson", "config-auth.json", "config-identitytoken.json"} {
		e.must("", "secret", "import", "--from-dockerconfig", fixture(f), "--project", "imp")
	}
	e.run("", "secret", "import", "--from-dockerconfig", fixture("malformed.json"))
	for _, args := range [][]string{
		{"secret", "list"}, {"secret", "list", "-o", "json"}, {"secret", "list", "--all-projects"},
		{"secret", "list", "--all-projects", "-o", "json"},
		{"secret", "show", "ghcr"}, {"secret", "show", "ghcr", "-o", "json"}, {"secret", "show", "tok", "-o", "json"},
		{"secret", "show", "ghcr-io", "--project", "imp"}, {"secret", "show", "docker-io", "--project", "imp", "-o", "json"},
		{"key", "rotate"}, {"secret", "list", "--all-projects"},
	} {
		e.must("", args...)
	}
	e.must(canary, "secret", "rotate", "ghcr", "--password-stdin")
	// Errors that carry the canary in their input must not echo it.
	e.run(canary+"\n"+canary, "secret", "rotate", "ghcr", "--password-stdin")
	e.run("", "secret", "create", "x", "--registry", "x.io", "--username", "u", "--password", canary)
	e.run("", "secret", "create", "x", "--registry", "https://u:"+canary+"@x.io", "--username", "u", "--password-stdin")
	// The store file holds the canary only sealed; checkNoCanary (cleanup)
	// greps every output and file.
	b, err := os.ReadFile(filepath.Join(e.home, "secrets.json"))
	if err != nil || len(b) == 0 {
		t.Fatal(err)
	}
}
