package dockerconfig

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"github.com/pullsecret/pullsecret/secret"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const dcCanary = "canary-pw-3f9a1c"

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestParseDockerConfig(t *testing.T) {
	t.Parallel()
	type cred struct {
		reg         secret.Pattern
		kind        secret.Kind
		user, value string
	}
	for _, tc := range []struct {
		name   string
		in     string
		format string
		creds  []cred
		notes  []string // "key: reason substring"
	}{
		{name: "dockerconfigjson", in: `{"auths":{"ghcr.io":{"username":"u","password":"` + dcCanary + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"ghcr.io", secret.Basic, "u", dcCanary}}},
		{name: "auth wins over username and password", in: `{"auths":{"ghcr.io":{"username":"x","password":"y","auth":"` + b64("u:"+dcCanary) + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"ghcr.io", secret.Basic, "u", dcCanary}}},
		{name: "auth with a colon in the password", in: `{"auths":{"r.io":{"auth":"` + b64("u:a:b") + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Basic, "u", "a:b"}}},
		{name: "auth unpadded and url-safe", in: `{"auths":{"r.io":{"auth":"` + strings.TrimRight(base64.URLEncoding.EncodeToString([]byte("u:??>>")), "=") + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Basic, "u", "??>>"}}},
		{name: "field names in any case", in: `{"auths":{"r.io":{"Username":"u","PASSWORD":"p"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Basic, "u", "p"}}},
		{name: "identity token wins", in: `{"auths":{"r.io":{"auth":"` + b64("00000000-0000-0000-0000-000000000000:") + `","identitytoken":"` + dcCanary + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Token, "", dcCanary}}},
		{name: "<token> user", in: `{"auths":{"r.io":{"username":"<token>","password":"` + dcCanary + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Token, "", dcCanary}}},
		{name: "keys normalised", in: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("a:b") + `"},"HTTPS://Reg.IO:443/v2/team/":{"auth":"` + b64("c:d") + `"},"http://127.0.0.1:5000":{"auth":"` + b64("e:f") + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"127.0.0.1:5000", secret.Basic, "e", "f"}, {"docker.io", secret.Basic, "a", "b"}, {"reg.io/team", secret.Basic, "c", "d"}}},
		{name: "equal aliases merge", in: `{"auths":{"docker.io":{"auth":"` + b64("a:b") + `"},"https://index.docker.io/v1/":{"username":"a","password":"b"}}}`,
			format: FormatDockerConfig, creds: []cred{{"docker.io", secret.Basic, "a", "b"}}},
		{name: "config.json with a credsStore", in: `{"auths":{"https://index.docker.io/v1/":{},"https://index.docker.io/v1/access-token":{},"q.io":{"auth":"` + b64("a:b") + `"},"n.io":null},"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud","q.io":"x"},"currentContext":"default"}`,
			format: FormatDockerConfig, creds: []cred{{"q.io", secret.Basic, "a", "b"}},
			notes: []string{`gcr.io: credentials are kept by the credential helper "gcloud"`, `https://index.docker.io/v1/: no credential in this file (the credential store "desktop" keeps it)`,
				`https://index.docker.io/v1/access-token: no credential`, `n.io: no credential`}},
		{name: "only a credsStore", in: `{"credsStore":"osxkeychain"}`, format: FormatDockerConfig,
			notes: []string{`credsStore: credentials are kept by the credential store "osxkeychain"`}},
		{name: "registry token and wildcard skipped", in: `{"auths":{"r.io":{"registrytoken":"` + dcCanary + `"},"*.example.com":{"auth":"` + b64("a:b") + `"}}}`,
			format: FormatDockerConfig, notes: []string{"*.example.com: wildcard", "r.io: holds a registry (bearer) token"}},
		{name: "legacy dockercfg", in: `{"r.io":{"auth":"` + b64("a:b") + `","email":"a@b"}}`,
			format: FormatDockercfg, creds: []cred{{"r.io", secret.Basic, "a", "b"}}},
		{name: "empty", in: `{}`, format: FormatDockercfg},
		{name: "BOM and space", in: "\xef\xbb\xbf \n" + `{"auths":{"r.io":{"auth":"` + b64("a:b") + `"}}}`,
			format: FormatDockerConfig, creds: []cred{{"r.io", secret.Basic, "a", "b"}}},
		{name: "secret manifest json", in: `{"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/dockerconfigjson","data":{".dockerconfigjson":"` + b64(`{"auths":{"r.io":{"auth":"`+b64("a:b")+`"}}}`) + `"}}`,
			format: FormatSecretJSON, creds: []cred{{"r.io", secret.Basic, "a", "b"}}},
		{name: "secret manifest json stringData", in: `{"kind":"Secret","stringData":{".dockerconfigjson":"{\"auths\":{\"r.io\":{\"auth\":\"` + b64("a:b") + `\"}}}"}}`,
			format: FormatSecretJSON, creds: []cred{{"r.io", secret.Basic, "a", "b"}}},
		{name: "secret manifest yaml", in: "apiVersion: v1\nkind: Secret\ndata:\n  .dockerconfigjson: " + b64(`{"auths":{"r.io":{"auth":"`+b64("a:b")+`"}}}`) + "\n",
			format: FormatSecretYAML, creds: []cred{{"r.io", secret.Basic, "a", "b"}}},
	} {
		cfg, err := ParseDockerConfig([]byte(tc.in))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if cfg.Format != tc.format {
			t.Errorf("%s: format %q, want %q", tc.name, cfg.Format, tc.format)
		}
		var got []cred
		for _, c := range cfg.Credentials {
			v := c.Value.Password
			if c.Kind == secret.Token {
				v = c.Value.IdentityToken
			}
			got = append(got, cred{c.Registry, c.Kind, c.Value.Username, v})
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.creds) {
			t.Errorf("%s: credentials %v, want %v", tc.name, got, tc.creds)
		}
		if len(cfg.Skipped) != len(tc.notes) {
			t.Errorf("%s: notes %v, want %v", tc.name, cfg.Skipped, tc.notes)
			continue
		}
		for i, n := range cfg.Skipped {
			if s := n.Key + ": " + n.Reason; !strings.HasPrefix(s, tc.notes[i]) {
				t.Errorf("%s: note %q, want %q", tc.name, s, tc.notes[i])
			}
		}
	}
}

func TestParseDockerConfigErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, err string }{
		{"", "empty file"},
		{"  \n\t", "empty file"},
		{`{"auths":`, "not valid JSON (syntax error at line 1, column 10)"},
		{"{\n\"auths\": {\"r.io\": {\"password\": " + dcCanary + "}}}", "not valid JSON (syntax error at line 2, column 33)"},
		{`{"auths":{"r.io":{"password":"` + dcCanary + `"}}`, "not valid JSON"},
		{`["` + dcCanary + `"]`, "not a Docker config file"},
		{`{"auths":[]}`, `"auths" is not an object`},
		{`{"auths":{},"credsStore":1}`, `"credsStore" is not a string`},
		{`{"auths":{},"credHelpers":[]}`, `"credHelpers" is not an object`},
		{`{"auths":{"r.io":"` + dcCanary + `"}}`, `registry "r.io": not a valid entry`},
		{`{"auths":{"r.io":{"password":12345678}}}`, `registry "r.io": not a valid entry`},
		{`{"auths":{"r.io":{"auth":"%%%` + dcCanary + `"}}}`, `registry "r.io": the "auth" field is not valid base64`},
		{`{"auths":{"r.io":{"auth":"` + b64(dcCanary) + `"}}}`, `does not decode to "username:password"`},
		{`{"auths":{"r.io":{"auth":"` + b64(":"+dcCanary) + `"}}}`, "a password without a username"},
		{`{"auths":{"r.io":{"username":"u"}}}`, "a username without a password"},
		{`{"auths":{"r.io/Bad":{"username":"u","password":"` + dcCanary + `"}}}`, `registry "r.io/Bad": registry pattern: invalid repository path`},
		{`{"auths":{"https://u:` + dcCanary + `@r.io":{"username":"u","password":"` + dcCanary + `"}}}`, `registry "https://***@r.io": registry pattern: server URL must not contain user info`},
		{`{"auths":{"ftp://` + dcCanary + `":{"username":"u","password":"` + dcCanary + `"}}}`, `registry "ftp://***"`},
		{`{"auths":{"r.io":{"auth":"` + b64("a:b") + `"},"http://r.io":{"auth":"` + b64("a:c") + `"}}}`, `registries "http://r.io" and "r.io" both name r.io, with different credentials`},
		{`{"r.io":"x"}`, `not a Docker config file: no "auths", and "r.io" is not a registry entry`},
		{`{"kind":"Secret","data":{}}`, "the Kubernetes Secret has no .dockerconfigjson"},
		{`{"kind":"Secret","data":{".dockerconfigjson":1}}`, "its data and stringData objects of strings"},
		{`{"kind":"Pod"}`, `a Kubernetes "Pod" manifest, not a Secret`},
		{`{"kind":"Secret","data":{".dockerconfigjson":"!!` + dcCanary + `"}}`, "data[.dockerconfigjson] is not valid base64"},
		{`{"kind":"Secret","data":{".dockerconfigjson":"` + b64(dcCanary) + `"}}`, "data[.dockerconfigjson] is not a JSON object"},
		{`{"kind":"Secret","data":{".dockerconfigjson":"` + b64(`{"auths":{"r.io":{"password":"`+dcCanary+`"`) + `"}}`, "data[.dockerconfigjson]: not valid JSON"},
		{`{"kind":"Secret","stringData":{".dockerconfigjson":"{\"kind\":\"Secret\"}"}}`, "a Kubernetes manifest inside a Secret's data"},
		{"kind: Secret\ndata:\n  .dockerconfigjson: \"" + dcCanary + "\\q\"\n", "line 3"},
		{"kind: Secret\ndata:\n  .dockerconfigjson: \"" + dcCanary + "\n", "line 3"},
		{"kind: Secret\ndata:\n  .dockerconfigjson: |x\n", "line 3"},
		{"kind: Secret\ndata: {.dockerconfigjson: " + dcCanary + "}\n", "is not a JSON object"},
		{"kind: Secret\ndata:\n  .dockerconfigjson: " + b64(`{"auths":{"r.io":{"auth":"`+b64(dcCanary)+`"}}}`) + "\n", `data[.dockerconfigjson]: registry "r.io": the "auth" field does not decode`},
		{strings.Repeat(" ", MaxDockerConfigSize+1), "larger than 4 MiB"},
		{"just text " + dcCanary, "not a Docker config file"},
	} {
		_, err := ParseDockerConfig([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParseDockerConfig(%.60q): %v, want ~ %q", tc.in, err, tc.err)
			continue
		}
		if strings.Contains(err.Error(), dcCanary) {
			t.Errorf("ParseDockerConfig(%.60q): error quotes the secret: %v", tc.in, err)
		}
	}
}

func TestDockerCredentialRedacted(t *testing.T) {
	t.Parallel()
	cfg, err := ParseDockerConfig([]byte(`{"auths":{"r.io":{"username":"u","password":"` + dcCanary + `"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"%v", "%+v", "%#v", "%s"} {
		if s := fmt.Sprintf(f, cfg); strings.Contains(s, dcCanary) {
			t.Errorf("%s prints the password: %s", f, s)
		}
		if s := fmt.Sprintf(f, cfg.Credentials[0]); strings.Contains(s, dcCanary) {
			t.Errorf("%s prints the password: %s", f, s)
		}
	}
}

func TestParseDockerConfigFixtures(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob(filepath.Join("..", "..", "testdata", "dockerconfig", "*"))
	if err != nil || len(files) < 6 {
		t.Fatalf("fixtures: %v %v", files, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := ParseDockerConfig(b)
		if strings.HasPrefix(filepath.Base(f), "malformed") {
			if err == nil || strings.Contains(err.Error(), dcCanary) {
				t.Errorf("%s: %v", f, err)
			}
			continue
		}
		if err != nil || len(cfg.Credentials) != 2 {
			t.Errorf("%s: %v, %d credentials", f, err, len(cfg.Credentials))
			continue
		}
		for _, c := range cfg.Credentials {
			if c.Value.Password != dcCanary && c.Value.IdentityToken != dcCanary {
				t.Errorf("%s: %s has the wrong value", f, c.Registry)
			}
		}
	}
}

// fuzzSecrets collects the credential fields of a JSON document the way a
// reader would spot them: password, identitytoken and the password inside
// auth, also inside a Secret's data.
func fuzzSecrets(v any, out *[]string) {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			s, isStr := x.(string)
			if !isStr {
				fuzzSecrets(x, out)
				continue
			}
			switch strings.ToLower(k) {
			case "password", "identitytoken":
				*out = append(*out, s)
			case "auth":
				if dec, err := decodeBase64(s); err == nil {
					if _, pw, ok := strings.Cut(string(dec), ":"); ok {
						*out = append(*out, pw)
					}
				}
			}
			if k == ".dockerconfigjson" || k == ".dockercfg" {
				inner := []byte(s)
				if dec, err := decodeBase64(s); err == nil {
					inner = dec
				}
				var iv any
				if json.Unmarshal(inner, &iv) == nil {
					fuzzSecrets(iv, out)
				}
			}
		}
	case []any:
		for _, x := range v {
			fuzzSecrets(x, out)
		}
	}
}

func FuzzParseDockerConfig(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "testdata", "dockerconfig", "*"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	for _, s := range []string{
		`{"auths":{"r.io":{"username":"u","password":"` + dcCanary + `"}}}`,
		`{"auths":{"bad ` + dcCanary + `":{"username":"u","password":"` + dcCanary + `"}}}`,
		`{"auths":{"` + dcCanary + `":{"auth":"` + b64(dcCanary) + `"}}}`,
		`{"auths":{"r.io":{"identitytoken":"` + dcCanary + `"},"docker.io":{"auth":"` + b64("a:"+dcCanary) + `"},"index.docker.io":{"auth":"` + b64("b:"+dcCanary) + `"}}}`,
		`{"kind":"Secret","stringData":{".dockerconfigjson":"{\"auths\":{\"r io\":{\"password\":\"` + dcCanary + `\",\"username\":\"u\"}}}"}}`,
		"kind: Secret\ndata:\n  .dockerconfigjson: |\n    {\"auths\": {}}\n",
		"kind: Secret\nstringData:\n  \".dockerconfigjson\": '{\"auths\":{\"r.io\":{\"auth\":\"x\"}}}'\n---\n",
		`{"credsStore":"desktop","credHelpers":{"a":"b"}}`,
		`{"r.io":{"auth":"` + b64("a:b") + `"}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseDockerConfig(data)
		var tree any
		var secrets []string
		if json.Unmarshal(data, &tree) == nil {
			fuzzSecrets(tree, &secrets)
		}
		check := func(what, s string) {
			for _, pw := range secrets {
				if len(pw) >= minScrub && strings.Contains(s, pw) {
					t.Fatalf("%s quotes the password %q: %s", what, pw, s)
				}
			}
		}
		if err != nil {
			check("error", err.Error())
			// The fixed parts of a message are not the input.
			msg := strings.ReplaceAll(err.Error(), notDockerConfig, "")
			if len(data) >= 16 && strings.Contains(msg, string(data)) {
				t.Fatalf("error quotes the input: %v", err)
			}
			return
		}
		for _, n := range cfg.Skipped {
			check("note", n.Key+" "+n.Reason)
		}
		for _, c := range cfg.Credentials {
			want := "dockerconfig.DockerCredential{" + string(c.Registry) + " " + string(c.Kind) + " REDACTED}"
			if got := fmt.Sprintf("%v|%+v|%#v", c, c, c); got != want+"|"+want+"|"+want {
				t.Fatalf("credential prints as %q", got)
			}
			if _, err := secret.ParsePattern(string(c.Registry)); err != nil {
				t.Fatalf("registry %q does not parse again: %v", c.Registry, err)
			}
			if err := secret.Validate(secret.Secret{Project: "p", Name: "n", Kind: c.Kind, Registries: []secret.Pattern{c.Registry}}, c.Value); err != nil {
				t.Fatalf("credential for %s does not validate: %v", c.Registry, err)
			}
		}
	})
}
