package credhelper

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/secret"
)

const canary = "canary-pw-51c0de"

func newLocal(t *testing.T, opts ...LocalOption) (*Local, *secret.Store) {
	t.Helper()
	s, err := secret.Open(filepath.Join(t.TempDir(), "home"))
	if err != nil {
		t.Fatal(err)
	}
	return NewLocal(s, opts...), s
}

func run(t *testing.T, h credentials.Helper, verb, in string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := credentials.HandleCommand(h, verb, strings.NewReader(in), &out)
	return out.String(), err
}

func TestGetForms(t *testing.T) {
	t.Parallel()
	h, s := newLocal(t)
	ctx := context.Background()
	mk := func(name, kind string, v secret.Value, regs ...string) {
		var ps []secret.Pattern
		for _, r := range regs {
			p, err := secret.ParsePattern(r)
			if err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		if _, err := s.Create(ctx, secret.Secret{Name: name, Kind: secret.Kind(kind), Registries: ps}, v); err != nil {
			t.Fatal(err)
		}
	}
	mk("local", "basic", secret.Value{Username: "bot", Password: canary}, "127.0.0.1:5000")
	mk("hub", "basic", secret.Value{Username: "hubuser", Password: "hubpw"}, "docker.io")
	mk("tok", "token", secret.Value{IdentityToken: "idtoken"}, "ghcr.io/acme")
	for _, tc := range []struct{ in, user, secret string }{
		{"127.0.0.1:5000", "bot", canary},
		{"http://127.0.0.1:5000", "bot", canary},
		{"127.0.0.1:5000/team/app", "bot", canary},
		{"https://index.docker.io/v1/", "hubuser", "hubpw"},
		{"docker.io", "hubuser", "hubpw"},
		{"index.docker.io/library/alpine", "hubuser", "hubpw"},
		{"ghcr.io/acme/agent", TokenUsername, "idtoken"},
		{"ghcr.io", TokenUsername, "idtoken"},
	} {
		out, err := run(t, h, "get", tc.in+"\n")
		if err != nil {
			t.Errorf("get %s: %v", tc.in, err)
			continue
		}
		var c credentials.Credentials
		if err := json.Unmarshal([]byte(out), &c); err != nil {
			t.Fatal(err)
		}
		if c.Username != tc.user || c.Secret != tc.secret || c.ServerURL != tc.in {
			t.Errorf("get %s: %s %s secret-ok=%v", tc.in, c.ServerURL, c.Username, c.Secret == tc.secret)
		}
	}
	for _, in := range []string{"127.0.0.1:5001", "ghcr.io/other/app", "quay.io"} {
		_, err := run(t, h, "get", in)
		if err == nil || err.Error() != "credentials not found in native keychain" {
			t.Errorf("get %s: %v, want the protocol's not-found text", in, err)
		}
	}
	for _, in := range []string{"", "ftp://x", "https://u:" + canary + "@h/"} {
		_, err := run(t, h, "get", in)
		if err == nil || credentials.IsErrCredentialsNotFound(err) {
			t.Errorf("get %q: %v, want a clear error", in, err)
		}
		if err != nil && strings.Contains(err.Error(), canary) {
			t.Errorf("get: error leaks the secret: %v", err)
		}
	}
}

func TestProject(t *testing.T) {
	t.Parallel()
	h, s := newLocal(t, WithProject("team-b"))
	ctx := context.Background()
	if _, err := s.Create(ctx, secret.Secret{Name: "a", Kind: secret.Basic, Registries: []secret.Pattern{"reg.io"}}, secret.Value{Username: "a", Password: "pa"}); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, h, "get", "reg.io"); !credentials.IsErrCredentialsNotFound(err) {
		t.Fatalf("default project's secret served to team-b: %v", err)
	}
	if _, err := s.Create(ctx, secret.Secret{Project: "team-b", Name: "b", Kind: secret.Basic, Registries: []secret.Pattern{"reg.io"}}, secret.Value{Username: "b", Password: "pb"}); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, h, "get", "reg.io")
	if err != nil || !strings.Contains(out, `"Username":"b"`) {
		t.Fatalf("team-b get: %s %v", out, err)
	}
}

func TestStoreEraseList(t *testing.T) {
	t.Parallel()
	h, s := newLocal(t)
	ctx := context.Background()
	login := func(url, user, pw string) {
		t.Helper()
		b, _ := json.Marshal(credentials.Credentials{ServerURL: url, Username: user, Secret: pw})
		if _, err := run(t, h, "store", string(b)); err != nil {
			t.Fatalf("store %s: %v", url, err)
		}
	}
	login("127.0.0.1:5000", "bot", canary)
	login("https://index.docker.io/v1/", "hub", "hubpw")
	login("ghcr.io", TokenUsername, "idtok")
	// A second login to the same registry replaces the value.
	login("http://127.0.0.1:5000/", "bot2", canary+"2")
	list, err := s.List(ctx, "")
	if err != nil || len(list) != 3 {
		t.Fatalf("after logins: %d secrets, %v", len(list), err)
	}
	out, err := run(t, h, "list", "")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]string
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"127.0.0.1:5000": "bot2", "docker.io": "hub", "ghcr.io": TokenUsername}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("list[%s] = %q, want %q", k, m[k], v)
		}
	}
	if strings.Contains(out, canary) {
		t.Fatal("list prints a secret")
	}
	out, err = run(t, h, "get", "127.0.0.1:5000")
	if err != nil || !strings.Contains(out, canary+"2") {
		t.Fatalf("get after re-login: %v", err)
	}
	if _, err := run(t, h, "erase", "127.0.0.1:5000"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, h, "get", "127.0.0.1:5000"); !credentials.IsErrCredentialsNotFound(err) {
		t.Fatalf("get after erase: %v", err)
	}
	if _, err := run(t, h, "erase", "127.0.0.1:5000"); !credentials.IsErrCredentialsNotFound(err) {
		t.Fatalf("second erase: %v", err)
	}
	// A secret with two registries loses only the erased one.
	p1, p2 := secret.Pattern("a.io"), secret.Pattern("b.io")
	if _, err := s.Create(ctx, secret.Secret{Name: "two", Kind: secret.Basic, Registries: []secret.Pattern{p1, p2}}, secret.Value{Username: "u", Password: "p"}); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, h, "erase", "a.io"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, h, "get", "b.io"); err != nil {
		t.Fatalf("b.io after erasing a.io: %v", err)
	}
	for _, bad := range []string{"{", `{"ServerURL":"","Username":"u","Secret":"x"}`, `{"ServerURL":"reg.io","Username":"","Secret":"` + canary + `"}`} {
		_, err := run(t, h, "store", bad)
		if err == nil {
			t.Errorf("store %q: no error", bad)
		} else if strings.Contains(err.Error(), canary) {
			t.Errorf("store error leaks: %v", err)
		}
	}
}

func TestNameFor(t *testing.T) {
	t.Parallel()
	for in, want := range map[secret.Pattern]string{
		"127.0.0.1:5000":      "127-0-0-1-5000",
		"docker.io/acme/team": "docker-io-acme-team",
		"[::1]:5000":          "1-5000",
		secret.Pattern(strings.Repeat("a", 80) + ".io"): strings.Repeat("a", 63),
	} {
		got := NameFor(in)
		if got != want {
			t.Errorf("NameFor(%s) = %s, want %s", in, got, want)
		}
		if err := secret.ValidName(got); err != nil {
			t.Errorf("NameFor(%s) = %s: %v", in, got, err)
		}
	}
}

// FuzzHelperStdin feeds arbitrary stdin to every verb: no panic, no leak of
// the stored secret in an error, and the store stays readable.
func FuzzHelperStdin(f *testing.F) {
	for _, s := range []string{"reg.io", "https://index.docker.io/v1/", `{"ServerURL":"x.io","Username":"u","Secret":"s"}`, "\x00", "{"} {
		f.Add("get", s)
		f.Add("store", s)
		f.Add("erase", s)
	}
	s, err := secret.Open(filepath.Join(f.TempDir(), "home"))
	if err != nil {
		f.Fatal(err)
	}
	if _, err := s.Create(context.Background(), secret.Secret{Name: "keep", Kind: secret.Basic, Registries: []secret.Pattern{"keep.io"}}, secret.Value{Username: "u", Password: canary}); err != nil {
		f.Fatal(err)
	}
	h := NewLocal(s)
	f.Fuzz(func(t *testing.T, verb, in string) {
		if verb != "get" && verb != "store" && verb != "erase" && verb != "list" {
			verb = "get"
		}
		if strings.Contains(in, "keep.io") {
			return // leave the sentinel secret alone
		}
		var out bytes.Buffer
		err := credentials.HandleCommand(h, verb, strings.NewReader(in), &out)
		if err != nil && strings.Contains(err.Error(), canary) {
			t.Fatalf("error leaks: %v", err)
		}
		if _, _, err := s.Match(context.Background(), "", secret.Target{Host: "keep.io"}); err != nil {
			t.Fatalf("store damaged by %s %q: %v", verb, in, err)
		}
	})
}

// TestStoreKeepsECR: `docker login` to a registry an ECR secret covers
// (with a token that secret handed out) leaves the secret as it is, and
// list names its user AWS.
func TestStoreKeepsECR(t *testing.T) {
	t.Parallel()
	h, s := newLocal(t)
	ctx := context.Background()
	host := secret.Pattern("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
	ecr := secret.Secret{Name: "prod", Kind: secret.ECR, Registries: []secret.Pattern{host}}
	if _, err := s.Create(ctx, ecr, secret.Value{AWS: &secret.AWSValue{AccessKeyID: "AKIAIOSFODNN7EXAMPLE", SecretAccessKey: canary}}); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(credentials.Credentials{ServerURL: "https://" + string(host), Username: "AWS", Secret: "short-lived-token"})
	if _, err := run(t, h, "store", string(b)); err != nil {
		t.Fatalf("store over an ECR secret: %v", err)
	}
	sec, v, err := s.Value(ctx, "", "prod")
	if err != nil || sec.Kind != secret.ECR || sec.Version != 1 || v.AWS == nil || v.AWS.SecretAccessKey != canary {
		t.Fatalf("ECR secret changed by store: kind %s version %d err %v", sec.Kind, sec.Version, err)
	}
	out, err := run(t, h, "list", "")
	if err != nil || !strings.Contains(out, `"`+string(host)+`":"AWS"`) {
		t.Fatalf("list: %s %v", out, err)
	}
}
