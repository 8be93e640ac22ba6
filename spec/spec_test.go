package spec

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

const canary = "canary-spec-pw-7d41a9"

// newStore makes a store with the secrets the tests name: in project acme,
// ghcr-acme (ghcr.io/acme), ghcr-all (ghcr.io), team-registry
// (registry.example.com:5000/team) and hub (docker.io); in project other,
// other-ghcr (ghcr.io/acme).
func newStore(t *testing.T) *secret.Store {
	t.Helper()
	s, err := secret.Open(filepath.Join(t.TempDir(), "home"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	mk := func(project, name string, regs ...string) {
		var ps []secret.Pattern
		for _, r := range regs {
			p, err := secret.ParsePattern(r)
			if err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		v := secret.Value{Username: "bot", Password: canary}
		if _, err := s.Create(ctx, secret.Secret{Project: project, Name: name, Kind: secret.Basic, Registries: ps}, v); err != nil {
			t.Fatal(err)
		}
	}
	mk("acme", "ghcr-acme", "ghcr.io/acme")
	mk("acme", "ghcr-all", "ghcr.io")
	mk("acme", "team-registry", "registry.example.com:5000/team")
	mk("acme", "hub", "docker.io")
	mk("other", "other-ghcr", "ghcr.io/acme")
	return s
}

type wantDiag struct {
	line  int
	field string
	text  string
}

func checkDiags(t *testing.T, err error, want []wantDiag) {
	t.Helper()
	var se *Error
	if !errors.As(err, &se) {
		t.Fatalf("want *spec.Error, got %v", err)
	}
	if len(se.Diagnostics) != len(want) {
		t.Fatalf("want %d diagnostics, got %d:\n%v", len(want), len(se.Diagnostics), err)
	}
	for i, w := range want {
		d := se.Diagnostics[i]
		if d.Line != w.line || d.Field != w.field || !strings.Contains(d.Message, w.text) {
			t.Errorf("diagnostic %d: got %s\nwant line %d field %q containing %q", i, d, w.line, w.field, w.text)
		}
		if d.File != "svc.yaml" {
			t.Errorf("diagnostic %d: file %q", i, d.File)
		}
		if !strings.HasPrefix(d.String(), "svc.yaml:") {
			t.Errorf("diagnostic %d does not start with the file: %s", i, d)
		}
	}
}

const head = "version: v1\nkind: Service\nmetadata: {name: agent}\n"

func TestParseErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		in   string
		want []wantDiag
	}{
		{"empty", "", []wantDiag{{1, "", "holds no spec"}}},
		{"malformed flow", "version: v1\nkind: Service\nmetadata: {name: agent\ncontainer:\n  image: x\n", []wantDiag{{3, "", "malformed YAML: did not find expected ',' or '}'"}}},
		{"malformed mapping", "version: v1\nkind: x: y\n", []wantDiag{{2, "", "malformed YAML: mapping values are not allowed"}}},
		{"tab", "version: v1\n\tkind: Service\n", []wantDiag{{2, "", "malformed YAML: found a tab character"}}},
		{"unknown anchor", head + "container:\n  image: *img\n", []wantDiag{{5, "", "unknown anchor 'img'"}}},
		{"two documents", head + "container: {image: a}\n---\nversion: v1\n", []wantDiag{{6, "", "a second YAML document"}}},
		{"not a mapping", "- a\n- b\n", []wantDiag{{1, "", "want a mapping, got a list"}}},
		{"unknown top field", head + "container: {image: a}\nreplicas: 3\n", []wantDiag{{5, "replicas", `unknown field "replicas"`}}},
		{"typo with suggestion", head + "container:\n  image: a\n  pull_secrets: ghcr-acme\n", []wantDiag{{6, "container.pull_secrets", `did you mean "pull_secret"?`}}},
		{"unknown env field", head + "container:\n  image: a\n  environment:\n    - {name: A, valeu: b}\n", []wantDiag{
			{7, "container.environment[0].valeu", `did you mean "value"?`},
			{7, "container.environment[0]", "give a value or a secret reference"},
		}},
		{"unknown secret ref field", head + "container:\n  image: a\n  environment:\n    - name: A\n      secret: {name: s, key: k, version: 2}\n", []wantDiag{{8, "container.environment[0].secret.version", `unknown field "version"`}}},
		{"duplicate key", head + "container:\n  image: a\n  image: b\n", []wantDiag{{6, "container.image", "given twice (first at line 5)"}}},
		{"missing fields", "version: v1\nmetadata: {}\ncontainer: {}\n", []wantDiag{
			{2, "metadata.name", "required field is missing"},
			{3, "container.image", "required field is missing"},
			{1, "kind", "required field is missing"},
		}},
		{"wrong version", "version: v2\nkind: Service\nmetadata: {name: a}\ncontainer: {image: a}\n", []wantDiag{{1, "version", `unsupported version "v2"`}}},
		{"numeric version", "version: 1\nkind: Service\nmetadata: {name: a}\ncontainer: {image: a}\n", []wantDiag{{1, "version", `unsupported version "1"`}}},
		{"wrong kind", "version: v1\nkind: Job\nmetadata: {name: a}\ncontainer: {image: a}\n", []wantDiag{{2, "kind", `unsupported kind "Job"`}}},
		{"bad service name", "version: v1\nkind: Service\nmetadata: {name: My_Agent}\ncontainer: {image: a}\n", []wantDiag{{3, "metadata.name", "invalid service name"}}},
		{"image not a string", head + "container:\n  image: [a, b]\n", []wantDiag{{5, "container.image", "want a string, got a list"}}},
		{"image empty", head + "container:\n  image: ''\n", []wantDiag{{5, "container.image", "must not be empty"}}},
		{"secrets not a list", head + "container:\n  image: a\n  secrets: openai-keys\n", []wantDiag{{6, "container.secrets", "want a list of secret names"}}},
		{"secret entry not a string", head + "container:\n  image: a\n  secrets: [{name: x}]\n", []wantDiag{{6, "container.secrets[0]", "want a string, got a mapping"}}},
		{"env not a list", head + "container:\n  image: a\n  environment: {A: b}\n", []wantDiag{{6, "container.environment", "want a list"}}},
		{"env value and secret", head + "container:\n  image: a\n  environment:\n    - name: A\n      value: b\n      secret: {name: s, key: k}\n", []wantDiag{{9, "container.environment[0]", "either value or secret, not both"}}},
		{"env missing name", head + "container:\n  image: a\n  environment:\n    - {value: b}\n", []wantDiag{{7, "container.environment[0].name", "required field is missing"}}},
		{"env secret missing key", head + "container:\n  image: a\n  environment:\n    - {name: A, secret: {name: s}}\n", []wantDiag{{7, "container.environment[0].secret.key", "required field is missing"}}},
		{"merge key", head + "base: &b {image: a}\ncontainer:\n  <<: *b\n", []wantDiag{
			{4, "base", `unknown field "base"`},
			{6, "container", "merge keys (<<) are not supported"},
			{6, "container.image", "required field is missing"},
		}},
		{"label value not scalar", "version: v1\nkind: Service\nmetadata:\n  name: a\n  labels: {tier: [x]}\ncontainer: {image: a}\n", []wantDiag{{5, "metadata.labels.tier", "want a string, got a list"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, err := Parse("svc.yaml", []byte(tc.in))
			if s != nil {
				t.Fatalf("want no spec, got %+v", s)
			}
			checkDiags(t, err, tc.want)
		})
	}
}

func TestParseOK(t *testing.T) {
	t.Parallel()
	in := head + `container:
  image: ghcr.io/acme/agent:1.4
  pull_secret: ghcr-acme
  secrets: [openai-keys, db]
  environment:
    - {name: LOG_LEVEL, value: info}
    - {name: PORT, value: 8080}
    - {name: EMPTY, value: ""}
    - {name: GITHUB_TOKEN, secret: {name: gh-room, key: token}}
`
	s, err := Parse("svc.yaml", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	c := s.Container
	if c.Image != "ghcr.io/acme/agent:1.4" || c.PullSecret != "ghcr-acme" || strings.Join(c.Secrets, ",") != "openai-keys,db" {
		t.Errorf("container: %+v", c)
	}
	if len(c.Environment) != 4 || c.Environment[1].Value != "8080" || c.Environment[2].Value != "" ||
		c.Environment[3].Secret == nil || *c.Environment[3].Secret != (SecretKeyRef{"gh-room", "token"}) {
		t.Errorf("environment: %+v", c.Environment)
	}
	if l, _ := s.Pos("container.environment[3].secret.name"); l != 12 {
		t.Errorf("position of the secret name: line %d", l)
	}
}

func plan(t *testing.T, store *secret.Store, in string, o Options) (*Plan, error) {
	t.Helper()
	s, err := Parse("svc.yaml", []byte(in))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if o.Project == "" {
		o.Project = "acme"
	}
	return MakePlan(context.Background(), s, store, o)
}

func TestPlanErrors(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	for _, tc := range []struct {
		name    string
		project string
		in      string
		want    []wantDiag
	}{
		{"pull secret missing", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: nope\n", []wantDiag{
			{6, "container.pull_secret", `pull secret "nope" does not exist in project acme (secret "ghcr-acme" of this project covers ghcr.io/acme/agent)`},
		}},
		{"pull secret of another project", "other", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: ghcr-acme\n", []wantDiag{
			{6, "container.pull_secret", `pull secret "ghcr-acme" does not exist in project other`},
		}},
		{"registry not covered", "", "container:\n  image: quay.io/acme/agent:1.4\n  pull_secret: ghcr-acme\n", []wantDiag{
			{6, "container.pull_secret", `pull secret "ghcr-acme" covers ghcr.io/acme, not the image's registry quay.io/acme/agent`},
		}},
		{"prefix not covered", "", "container:\n  image: ghcr.io/acmeb/agent:1.4\n  pull_secret: ghcr-acme\n", []wantDiag{
			{6, "container.pull_secret", "covers ghcr.io/acme, not the image's registry ghcr.io/acmeb/agent"},
		}},
		{"port matters", "", "container:\n  image: registry.example.com/team/w:1\n  pull_secret: team-registry\n", []wantDiag{
			{6, "container.pull_secret", "covers registry.example.com:5000/team, not"},
		}},
		{"a closer secret wins", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: ghcr-all\n", []wantDiag{
			{6, "container.pull_secret", `secret "ghcr-acme" covers it more closely through ghcr.io/acme`},
		}},
		{"invalid secret name", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: Bad_Name\n", []wantDiag{
			{6, "container.pull_secret", "invalid name"},
		}},
		{"invalid image", "", "container:\n  image: 'ghcr.io/Acme/agent:1.4'\n  pull_secret: ghcr-acme\n", []wantDiag{
			{5, "container.image", "invalid image reference"},
		}},
		{"pull secret as runtime secret", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: ghcr-acme\n  secrets: [openai-keys, ghcr-acme]\n", []wantDiag{
			{7, "container.secrets[1]", `"ghcr-acme" is an image pull secret of project acme: it is read while pulling only`},
		}},
		{"another pull secret as runtime secret", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  secrets:\n    - hub\n", []wantDiag{
			{7, "container.secrets[0]", `"hub" is an image pull secret`},
		}},
		{"pull secret in environment", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: ghcr-acme\n  environment:\n    - name: REGISTRY_PASSWORD\n      secret: {name: ghcr-acme, key: password}\n", []wantDiag{
			{9, "container.environment[0].secret.name", `"ghcr-acme" is an image pull secret of project acme: it is read while pulling only and is never a runtime value`},
		}},
		{"pull secret name of spec in env, other project", "other", "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: other-ghcr\n  environment:\n    - {name: X, secret: {name: other-ghcr, key: password}}\n", []wantDiag{
			{8, "container.environment[0].secret.name", "is an image pull secret of project other"},
		}},
		{"duplicate runtime secret", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  secrets: [a, a]\n", []wantDiag{
			{6, "container.secrets[1]", `secret "a" listed twice`},
		}},
		{"bad env name", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  environment:\n    - {name: 1ABC, value: x}\n", []wantDiag{
			{7, "container.environment[0].name", "invalid environment variable name"},
		}},
		{"duplicate env", "", "container:\n  image: ghcr.io/acme/agent:1.4\n  environment:\n    - {name: A, value: x}\n    - {name: A, value: y}\n", []wantDiag{
			{8, "container.environment[1].name", "A is set twice"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := plan(t, store, head+tc.in, Options{Project: tc.project})
			checkDiags(t, err, tc.want)
		})
	}
}

func TestPlanErrorsKeepWarnings(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	p, err := plan(t, store, head+"container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: nope\n  environment:\n    - {name: AWS_ACCESS_KEY_ID, value: AKIAIOSFODNN7EXAMPLE}\n", Options{})
	if p != nil {
		t.Errorf("a spec with errors has no plan")
	}
	checkDiags(t, err, []wantDiag{{6, "container.pull_secret", "does not exist"}})
	w := err.(*Error).Warnings
	if len(w) != 1 || w[0].Line != 8 || w[0].Field != "container.environment[0].value" || !strings.Contains(w[0].Message, "looks like a credential (it looks like an AWS access key id)") {
		t.Errorf("warnings: %v", w)
	}
	if strings.Contains(err.Error(), "AKIAIOSFODNN7EXAMPLE") {
		t.Errorf("a diagnostic quotes the value: %v", err)
	}
}

func TestPlan(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	in := head + `container:
  image: ghcr.io/acme/agent:1.4
  pull_secret: ghcr-acme
  secrets: [openai-keys]
  environment:
    - {name: LOG_LEVEL, value: info}
    - {name: GITHUB_TOKEN, secret: {name: gh-room, key: token}}
    - {name: SLACK, value: xoxb-123456789012-abcdefghijkl}
`
	p, err := plan(t, store, in, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := PullPlan{Image: "ghcr.io/acme/agent:1.4", Registry: "ghcr.io", Repository: "acme/agent", Tag: "1.4",
		PullSecret: "ghcr-acme", SecretRegistry: "ghcr.io/acme", Via: ViaDirect, PullImage: "ghcr.io/acme/agent:1.4"}
	if p.Pull != want {
		t.Errorf("pull plan:\n got %+v\nwant %+v", p.Pull, want)
	}
	if p.Runtime.Pinned || p.Runtime.Image != "ghcr.io/acme/agent:1.4" {
		t.Errorf("runtime image: %+v", p.Runtime)
	}
	if len(p.Runtime.Secrets) != 1 || p.Runtime.Secrets[0] != (SecretMount{"openai-keys", "/run/secrets/openai-keys"}) {
		t.Errorf("runtime secrets: %+v", p.Runtime.Secrets)
	}
	env := p.Runtime.Environment
	if len(env) != 3 || *env[0].Value != "info" || env[1].Secret.Name != "gh-room" || !env[2].Redacted || env[2].Value != nil {
		t.Errorf("environment: %+v", env)
	}
	if len(p.Warnings) != 1 || p.Warnings[0].Line != 11 || p.Warnings[0].Field != "container.environment[2].value" {
		t.Errorf("warnings: %+v", p.Warnings)
	}
	b, _ := json.Marshal(p)
	for _, bad := range []string{canary, "xoxb-123456789012"} {
		if strings.Contains(string(b), bad) {
			t.Errorf("plan holds %q: %s", bad, b)
		}
	}
	// The pull secret's name never appears in the runtime plan.
	rb, _ := json.Marshal(p.Runtime)
	if strings.Contains(string(rb), "ghcr-acme") {
		t.Errorf("runtime plan names the pull secret: %s", rb)
	}

	p.Pin("sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
	if p.Runtime.Image != "ghcr.io/acme/agent@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" || !p.Runtime.Pinned {
		t.Errorf("pinned: %+v", p.Runtime)
	}
}

func TestPlanImages(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	dgst := "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
	for _, tc := range []struct {
		image, secret               string
		o                           Options
		registry, repo, tag, digest string
		pullImage, runtimeImage     string
	}{
		{"alpine", "", Options{}, "docker.io", "library/alpine", "latest", "", "docker.io/library/alpine:latest", "docker.io/library/alpine:latest"},
		{"docker.io/acme/app:1", "hub", Options{}, "docker.io", "acme/app", "1", "", "docker.io/acme/app:1", "docker.io/acme/app:1"},
		{"index.docker.io/acme/app:1", "hub", Options{}, "docker.io", "acme/app", "1", "", "docker.io/acme/app:1", "docker.io/acme/app:1"},
		{"registry.example.com:5000/team/w:2@" + dgst, "team-registry", Options{}, "registry.example.com:5000", "team/w", "2", dgst,
			"registry.example.com:5000/team/w:2@" + dgst, "registry.example.com:5000/team/w@" + dgst},
		{"registry.example.com:5000/team/w@" + dgst, "team-registry", Options{}, "registry.example.com:5000", "team/w", "", dgst,
			"registry.example.com:5000/team/w@" + dgst, "registry.example.com:5000/team/w@" + dgst},
		{"ghcr.io/acme/agent:1.4", "ghcr-acme", Options{Via: ViaProxy, Proxy: "proxy.internal:5000"}, "ghcr.io", "acme/agent", "1.4", "",
			"proxy.internal:5000/ghcr.io/acme/agent:1.4", "ghcr.io/acme/agent:1.4"},
	} {
		in := head + "container:\n  image: '" + tc.image + "'\n"
		if tc.secret != "" {
			in += "  pull_secret: " + tc.secret + "\n"
		}
		p, err := plan(t, store, in, tc.o)
		if err != nil {
			t.Errorf("%s: %v", tc.image, err)
			continue
		}
		got := p.Pull
		if got.Registry != tc.registry || got.Repository != tc.repo || got.Tag != tc.tag || got.Digest != tc.digest ||
			got.PullImage != tc.pullImage || p.Runtime.Image != tc.runtimeImage {
			t.Errorf("%s: pull %+v runtime %+v", tc.image, got, p.Runtime)
		}
		if tc.digest != "" && !p.Runtime.Pinned {
			t.Errorf("%s: a digest in the spec pins the runtime image", tc.image)
		}
	}
}

func TestLooksLikeCredential(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, value string
		want        bool
	}{
		{"LOG_LEVEL", "info", false},
		{"PORT", "8080", false},
		{"URL", "https://api.example.com/v1/endpoint?x=1", false},
		{"SERVICE", "my-service-name-production", false},
		{"VERSION", "v1.2.3", false},
		{"GREETING", "hello world, this is a fairly long sentence", false},
		{"GITHUB_TOKEN", "ghp_" + strings.Repeat("aB3", 12), true},
		{"X", "github_pat_" + strings.Repeat("aB3_", 10), true},
		{"X", "glpat-" + strings.Repeat("xY9", 7), true},
		{"X", "AKIAIOSFODNN7EXAMPLE", true},
		{"X", "xoxb-123456789012-abcdefghijkl", true},
		{"X", "sk-" + strings.Repeat("Ab1", 16), true},
		{"X", "sk-ant-api03-" + strings.Repeat("Zz9", 10), true},
		{"X", "sk-short", false},
		{"X", "AKIA", false},
		{"X", "-----BEGIN OPENSSH PRIVATE KEY-----", true},
		{"X", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dGhpcyBpcyBub3QgYSByZWFsIHNpZw", true},
		{"X", "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg", true},
		{"X", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", true},
		{"DB_PASSWORD", "hunter2hunter2", true},
		{"DB_PASSWORD", "/run/secrets/db/password", false},
		{"API_TOKEN_FILE", "/etc/token", false},
		{"AUTH_ENABLED", "true", false},
		{"AUTH_URL", "https://auth.example.com/login", false},
		{"AUTH_URL", "https://user:pw@auth.example.com/login", true},
	} {
		if got, why := LooksLikeCredential(tc.name, tc.value); got != tc.want {
			t.Errorf("LooksLikeCredential(%s, %q) = %v (%s), want %v", tc.name, tc.value, got, why, tc.want)
		}
	}
}

func TestHostOnlyWinner(t *testing.T) {
	t.Parallel()
	mk := func(name string, regs ...string) secret.Secret {
		s := secret.Secret{Name: name}
		for _, r := range regs {
			s.Registries = append(s.Registries, secret.Pattern(r))
		}
		return s
	}
	for _, tc := range []struct {
		all        []secret.Secret
		host, want string
	}{
		{[]secret.Secret{mk("a", "reg.io"), mk("b", "reg.io/team")}, "reg.io", "a"},
		{[]secret.Secret{mk("b", "reg.io/team")}, "reg.io", "b"},
		{[]secret.Secret{mk("b", "reg.io/team"), mk("c", "reg.io/other")}, "reg.io", ""},
		{[]secret.Secret{mk("b", "reg.io/team", "reg.io/team2")}, "reg.io", "b"},
		{[]secret.Secret{mk("b", "other.io")}, "reg.io", ""},
	} {
		if got, why := HostOnlyWinner(tc.all, tc.host); got != tc.want || (got == "") != (why != "") {
			t.Errorf("HostOnlyWinner(%v, %s) = %q (%s), want %q", tc.all, tc.host, got, why, tc.want)
		}
	}
}

// FuzzParse: any input gives a spec or diagnostics with a line, never a
// panic.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		head + "container:\n  image: ghcr.io/acme/agent:1.4\n  pull_secret: ghcr-acme\n  secrets: [a]\n  environment:\n    - {name: A, value: b}\n    - {name: B, secret: {name: s, key: k}}\n",
		"a: &x [*x]\n", "- [", "{", "version: v1\nkind: Service\nmetadata: {name: a}\ncontainer: {image: '@@'}\n", "<<: *a\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse("f.yaml", data)
		if (s == nil) == (err == nil) {
			t.Fatalf("spec %v and error %v", s, err)
		}
		if err != nil {
			e, ok := err.(*Error)
			if !ok || len(e.Diagnostics) == 0 {
				t.Fatalf("error %T %v", err, err)
			}
			for _, d := range e.Diagnostics {
				if d.File != "f.yaml" || d.Line < 0 || d.Message == "" {
					t.Fatalf("diagnostic %+v", d)
				}
			}
		}
	})
}
