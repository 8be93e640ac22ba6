package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/pullsecret/pullsecret/credhelper/kubelet"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	kubeletcfg "k8s.io/kubelet/config/v1"
	"sigs.k8s.io/yaml"
)

const cfgToken = "pst_0123456789abcdef_canarytokencanarytokencanarytokencanarytokencanaryt"

// cfgRun runs the CLI with getenv and returns its exit code and output.
func cfgRun(t *testing.T, getenv func(string) string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(""), &out, &errb, getenv)
	for _, s := range []string{out.String(), errb.String()} {
		if strings.Contains(s, cfgToken) {
			t.Errorf("pullsecret %q printed the token", args)
		}
	}
	return code, out.String(), errb.String()
}

// fixture copies testdata/configure/name into a fresh folder.
func cfgFixture(t *testing.T, name, as string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../testdata/configure", name))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), as)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func cfgNoEnv(string) string { return "" }

// snapshot lists the files of a folder with their content.
func cfgSnapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, _ := os.ReadFile(p)
			out[p] = string(b)
		}
		return nil
	})
	return out
}

// idempotent runs args three times: --dry-run (writes nothing, prints a
// diff), for real (writes, with a backup when the file existed), and again
// (changes nothing, writes nothing).
func cfgIdempotent(t *testing.T, dir string, args ...string) (diff string) {
	t.Helper()
	before := cfgSnapshot(t, dir)
	code, out, stderr := cfgRun(t, cfgNoEnv, append(args, "--dry-run")...)
	if code != 0 {
		t.Fatalf("--dry-run: exit %d: %s", code, stderr)
	}
	if !strings.Contains(out, "--- ") || !strings.Contains(out, "+++ ") || !strings.Contains(out, "@@ ") {
		t.Errorf("--dry-run printed no diff:\n%s", out)
	}
	if !reflect.DeepEqual(before, cfgSnapshot(t, dir)) {
		t.Fatal("--dry-run wrote something")
	}
	if code, _, stderr := cfgRun(t, cfgNoEnv, args...); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	after := cfgSnapshot(t, dir)
	backups := 0
	for p := range after {
		if strings.Contains(filepath.Base(p), ".bak-") {
			backups++
			orig := p[:strings.Index(p, ".bak-")]
			if after[p] != before[orig] {
				t.Errorf("backup %s is not the old %s", p, orig)
			}
		}
	}
	existed := 0
	for p := range before {
		if !strings.Contains(p, ".bak-") {
			existed++
		}
	}
	if backups != existed {
		t.Errorf("%d backups for %d existing files", backups, existed)
	}
	code, out, stderr = cfgRun(t, cfgNoEnv, args...)
	if code != 0 {
		t.Fatalf("second run: exit %d: %s", code, stderr)
	}
	if !reflect.DeepEqual(after, cfgSnapshot(t, dir)) {
		t.Error("the second run changed files")
	}
	if strings.Contains(out, "updated") || strings.Contains(out, "created") || !strings.Contains(out, "unchanged") {
		t.Errorf("second run says: %s", out)
	}
	code, out, _ = cfgRun(t, cfgNoEnv, append(args, "--dry-run")...)
	if code != 0 || strings.Contains(out, "@@") {
		t.Errorf("a dry run after the change still has a diff: %s", out)
	}
	return diff
}

func TestConfigureDocker(t *testing.T) {
	t.Parallel()
	path := cfgFixture(t, "docker-config.json", "docker/config.json")
	var orig map[string]any
	b, _ := os.ReadFile(path)
	json.Unmarshal(b, &orig)
	cfgIdempotent(t, filepath.Dir(path), "configure", "docker", "--config", path, "--registry", "ghcr.io", "--registry", "127.0.0.1:5000", "--registry", "docker.io")
	b, _ = os.ReadFile(path)
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	helpers := got["credHelpers"].(map[string]any)
	for k, v := range map[string]string{"ghcr.io": "pullsecret", "127.0.0.1:5000": "pullsecret", "docker.io": "pullsecret", "https://index.docker.io/v1/": "pullsecret", "gcr.io": "gcloud"} {
		if helpers[k] != v {
			t.Errorf("credHelpers[%s] = %v", k, helpers[k])
		}
	}
	for _, k := range []string{"auths", "credsStore", "proxies", "psFormat", "experimentalFeature"} {
		if !reflect.DeepEqual(got[k], orig[k]) {
			t.Errorf("%s changed: %v -> %v", k, orig[k], got[k])
		}
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", fi.Mode())
	}
}

func TestConfigureDockerNewFile(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "docker")
	env := func(k string) string {
		if k == "DOCKER_CONFIG" {
			return dir
		}
		return ""
	}
	code, out, stderr := cfgRun(t, env, "configure", "docker", "--registry", "https://GHCR.io/")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil || !strings.Contains(out, "created") {
		t.Fatal(err, out)
	}
	var cfg struct {
		Auths       map[string]any    `json:"auths"`
		CredHelpers map[string]string `json:"credHelpers"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.CredHelpers["ghcr.io"] != "pullsecret" || cfg.Auths == nil {
		t.Errorf("config.json: %s", b)
	}
}

func TestConfigurePodman(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	auth := filepath.Join(dir, "auth.json")
	if err := os.WriteFile(auth, []byte(`{"auths":{"quay.io":{"auth":"eDp5"}},"credHelpers":{"gcr.io":"gcloud"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	rc := filepath.Join(dir, "registries.conf")
	orig, _ := os.ReadFile("../../testdata/configure/registries.conf")
	if err := os.WriteFile(rc, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	cfgIdempotent(t, dir, "configure", "podman", "--auth-file", auth, "--registries-conf", rc,
		"--registry", "ghcr.io", "--registry", "docker.io", "--registry", "127.0.0.1:5000=local", "--proxy", "127.0.0.1:6000", "--insecure")
	b, _ := os.ReadFile(auth)
	var a struct {
		Auths       map[string]any    `json:"auths"`
		CredHelpers map[string]string `json:"credHelpers"`
	}
	json.Unmarshal(b, &a)
	if a.CredHelpers["ghcr.io"] != "pullsecret" || a.CredHelpers["127.0.0.1:6000"] != "pullsecret" || a.CredHelpers["gcr.io"] != "gcloud" || a.Auths["quay.io"] == nil {
		t.Errorf("auth.json: %s", b)
	}
	got, _ := os.ReadFile(rc)
	var conf struct {
		Unqualified []string          `toml:"unqualified-search-registries"`
		ShortName   string            `toml:"short-name-mode"`
		Aliases     map[string]string `toml:"aliases"`
		Registry    []struct {
			Location, Prefix string
			Blocked          bool
			Mirror           []struct {
				Location string
				Insecure bool
			}
		}
	}
	if _, err := toml.Decode(string(got), &conf); err != nil {
		t.Fatalf("registries.conf: %v\n%s", err, got)
	}
	if len(conf.Unqualified) != 2 || conf.ShortName != "enforcing" || conf.Aliases["fedora"] == "" {
		t.Errorf("unrelated settings lost:\n%s", got)
	}
	mirrors := map[string][]string{}
	for _, r := range conf.Registry {
		for _, m := range r.Mirror {
			mirrors[r.Location] = append(mirrors[r.Location], m.Location)
			if strings.HasPrefix(m.Location, "127.0.0.1:6000/") && !m.Insecure {
				t.Errorf("mirror %s is not insecure", m.Location)
			}
		}
	}
	want := map[string][]string{
		"docker.io":      {"127.0.0.1:6000/docker.io", "mirror.corp/docker.io"},
		"ghcr.io":        {"127.0.0.1:6000/ghcr.io"},
		"127.0.0.1:5000": {"127.0.0.1:6000/local"},
	}
	if !reflect.DeepEqual(mirrors, want) {
		t.Errorf("mirrors %v, want %v\n%s", mirrors, want, got)
	}
	for _, keep := range []string{"# Site-wide settings: keep them.", "# Our internal mirror of Docker Hub.", "blocked = false"} {
		if !strings.Contains(string(got), keep) {
			t.Errorf("lost %q:\n%s", keep, got)
		}
	}
}

func TestConfigurePodmanErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	v1 := filepath.Join(dir, "v1.conf")
	os.WriteFile(v1, []byte("[registries.search]\nregistries = ['docker.io']\n"), 0o644)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--auth-file", filepath.Join(dir, "a.json")}, 2, "at least one --registry"},
		{[]string{"--auth-file", filepath.Join(dir, "a.json"), "--registry", "127.0.0.1:5000", "--proxy", "p:1", "--registries-conf", filepath.Join(dir, "r.conf")}, 2, "give the alias the server knows it by"},
		{[]string{"--auth-file", filepath.Join(dir, "a.json"), "--registry", "ghcr.io", "--proxy", "p:1", "--registries-conf", v1}, 1, "v1 registries.conf"},
		{[]string{"--auth-file", filepath.Join(dir, "a.json"), "--registry", "ghcr.io", "--insecure"}, 2, "go with --proxy"},
		{[]string{"--auth-file", filepath.Join(dir, "a.json"), "--registry", "ghcr.io/acme"}, 2, "without a path"},
	} {
		code, _, stderr := cfgRun(t, cfgNoEnv, append([]string{"configure", "podman"}, tc.args...)...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d %s", tc.args, code, stderr)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "a.json")); err == nil {
		t.Error("a failed configure wrote auth.json")
	}
}

func TestConfigureContainerd(t *testing.T) {
	t.Parallel()
	hosts := filepath.Dir(cfgFixture(t, "hosts.toml", "certs.d/ghcr.io/hosts.toml"))
	hostsDir := filepath.Dir(hosts)
	tokFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokFile, []byte(cfgToken+"\n"), 0o600)
	cfgIdempotent(t, hostsDir, "configure", "containerd", "--hosts-dir", hostsDir, "--proxy", "http://127.0.0.1:6000",
		"--upstream", "ghcr.io", "--upstream", "docker.io", "--upstream", "127.0.0.1:5000", "--token-file", tokFile)
	header := "Basic " + base64.StdEncoding.EncodeToString([]byte("pullsecret:"+cfgToken))
	for host, server := range map[string]string{"ghcr.io": "https://ghcr.io", "docker.io": "https://registry-1.docker.io", "127.0.0.1:5000": "https://127.0.0.1:5000"} {
		p := filepath.Join(hostsDir, host, "hosts.toml")
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var hf struct {
			Server string
			Host   map[string]struct {
				Capabilities []string
				CA           string
				Header       map[string][]string
			}
		}
		md, err := toml.Decode(string(b), &hf)
		if err != nil {
			t.Fatalf("%s: %v\n%s", p, err, b)
		}
		h := hf.Host["http://127.0.0.1:6000"]
		if hf.Server != server || len(h.Capabilities) != 2 || len(h.Header["Authorization"]) != 1 || h.Header["Authorization"][0] != header {
			t.Errorf("%s:\n%s", p, b)
		}
		// The proxy is the first host containerd tries.
		for _, k := range md.Keys() {
			if len(k) == 2 && k[0] == "host" {
				if k[1] != "http://127.0.0.1:6000" {
					t.Errorf("%s: first host %s", p, k[1])
				}
				break
			}
		}
		if host == "ghcr.io" {
			if m := hf.Host["https://mirror.corp"]; m.CA != "/etc/ssl/corp-ca.pem" || len(m.Capabilities) != 2 || !strings.Contains(string(b), "# containerd hosts for ghcr.io, written by hand.") {
				t.Errorf("the existing mirror was lost:\n%s", b)
			}
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v (it holds the token)", p, fi.Mode())
		}
	}
	// A new token replaces the header; nothing else changes.
	os.WriteFile(tokFile, []byte("pst_fedcba9876543210_another\n"), 0o600)
	if code, _, stderr := cfgRun(t, cfgNoEnv, "configure", "containerd", "--hosts-dir", hostsDir, "--proxy", "http://127.0.0.1:6000", "--upstream", "ghcr.io", "--token-file", tokFile); code != 0 {
		t.Fatal(stderr)
	}
	b, _ := os.ReadFile(filepath.Join(hostsDir, "ghcr.io", "hosts.toml"))
	if strings.Contains(string(b), base64.StdEncoding.EncodeToString([]byte("pullsecret:"+cfgToken))) || strings.Count(string(b), "[host.") != 3 {
		t.Errorf("after a new token:\n%s", b)
	}
}

func TestConfigureContainerdDryRunHidesNothingButWritesNothing(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tokFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokFile, []byte(cfgToken), 0o600)
	code, out, stderr := cfgRun(t, cfgNoEnv, "configure", "containerd", "--hosts-dir", dir, "--proxy", "p.example:5000", "--upstream", "ghcr.io", "--token-file", tokFile, "--dry-run")
	if code != 0 || !strings.Contains(out, "--- /dev/null") || !strings.Contains(out, `+[host."https://p.example:5000"]`) {
		t.Errorf("exit %d %s %s", code, out, stderr)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Error("--dry-run wrote")
	}
}

// kubeletDecodeConfig decodes a CredentialProviderConfig with kubelet's
// types and strict codec.
func cfgKubeletDecode(t *testing.T, data []byte) *kubeletcfg.CredentialProviderConfig {
	t.Helper()
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	if err := kubeletcfg.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	obj, _, err := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer().Decode(js, nil, nil)
	if err != nil {
		t.Fatalf("kubelet cannot decode the config: %v\n%s", err, data)
	}
	return obj.(*kubeletcfg.CredentialProviderConfig)
}

func TestConfigureKubelet(t *testing.T) {
	t.Parallel()
	path := cfgFixture(t, "kubelet-credential-providers.yaml", "kubelet/providers.yaml")
	cfgIdempotent(t, filepath.Dir(path), "configure", "kubelet", "--config", path, "--server", "https://pullsecret.internal:5000/",
		"--match-image", "ghcr.io", "--match-image", "*.registry.example.com", "--match-image", "pullsecret.internal:5000",
		"--annotation-key", "pullsecret.dev/project")
	b, _ := os.ReadFile(path)
	cfg := cfgKubeletDecode(t, b)
	if len(cfg.Providers) != 2 || cfg.Providers[0].Name != "ecr-credential-provider" || len(cfg.Providers[0].Args) != 1 {
		t.Fatalf("providers: %+v", cfg.Providers)
	}
	p := cfg.Providers[1]
	if p.Name != "pullsecret-credential-provider" || p.APIVersion != kubelet.ProviderAPIVersion || p.DefaultCacheDuration == nil || p.DefaultCacheDuration.Duration.String() != "5m0s" {
		t.Errorf("provider %+v", p)
	}
	if !reflect.DeepEqual(p.MatchImages, []string{"ghcr.io", "*.registry.example.com", "pullsecret.internal:5000"}) {
		t.Errorf("matchImages %v", p.MatchImages)
	}
	if len(p.Env) != 1 || p.Env[0].Name != "PULLSECRET_SERVER" || p.Env[0].Value != "https://pullsecret.internal:5000" {
		t.Errorf("env %+v", p.Env)
	}
	ta := p.TokenAttributes
	if ta == nil || ta.ServiceAccountTokenAudience != "pullsecret" || string(ta.CacheType) != "ServiceAccount" || ta.RequireServiceAccount == nil || !*ta.RequireServiceAccount ||
		!reflect.DeepEqual(ta.RequiredServiceAccountAnnotationKeys, []string{"pullsecret.dev/project"}) {
		t.Errorf("tokenAttributes %+v", ta)
	}
	// Every matchImages entry is one kubelet accepts, and covers what it says.
	for img, want := range map[string]bool{"ghcr.io/acme/app:1": true, "a.registry.example.com/x": true, "registry.example.com/x": false, "pullsecret.internal:5000/ghcr.io/acme/app": true} {
		got := false
		for _, m := range p.MatchImages {
			if ok, _ := kubelet.MatchImage(m, img); ok {
				got = true
			}
		}
		if got != want {
			t.Errorf("matchImages cover %s: %v", img, got)
		}
	}
	if !strings.Contains(string(b), "# Image credential providers of this node.") {
		t.Errorf("the file's comment was lost:\n%s", b)
	}
	// Switching to local mode replaces the server settings.
	if code, _, stderr := cfgRun(t, cfgNoEnv, "configure", "kubelet", "--config", path, "--project", "acme", "--match-image", "ghcr.io"); code != 0 {
		t.Fatal(stderr)
	}
	b, _ = os.ReadFile(path)
	p = cfgKubeletDecode(t, b).Providers[1]
	if p.TokenAttributes != nil || len(p.Env) != 1 || p.Env[0].Name != "PULLSECRET_PROJECT" || p.Env[0].Value != "acme" {
		t.Errorf("local mode: %+v", p)
	}
}

func TestConfigureKubeletStdoutAndErrors(t *testing.T) {
	t.Parallel()
	code, out, stderr := cfgRun(t, cfgNoEnv, "configure", "kubelet", "--config", "-", "--server", "https://s:1", "--match-image", "ghcr.io")
	if code != 0 {
		t.Fatal(stderr)
	}
	cfg := cfgKubeletDecode(t, []byte(out))
	if len(cfg.Providers) != 1 || cfg.APIVersion != "kubelet.config.k8s.io/v1" || cfg.Kind != "CredentialProviderConfig" {
		t.Errorf("config %s", out)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--server", "https://s"}, "--config FILE is required"},
		{[]string{"--config", "-", "--server", "https://s"}, "at least one --match-image"},
		{[]string{"--config", "-", "--server", "https://s", "--match-image", "https://ghcr.io"}, "no scheme"},
		{[]string{"--config", "-", "--server", "https://s", "--match-image", "reg[.io"}, "match image"},
		{[]string{"--config", "-", "--match-image", "ghcr.io"}, "give --server URL"},
		{[]string{"--config", "-", "--server", "https://s", "--project", "p", "--match-image", "ghcr.io"}, "cannot be used together"},
		{[]string{"--config", "-", "--server", "s", "--match-image", "ghcr.io"}, "--server: want"},
		{[]string{"--config", "-", "--server", "https://s", "--cache-type", "Pod", "--match-image", "ghcr.io"}, "--cache-type"},
	} {
		code, _, stderr := cfgRun(t, cfgNoEnv, append([]string{"configure", "kubelet"}, tc.args...)...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d %s", tc.args, code, stderr)
		}
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "other.yaml")
	os.WriteFile(bad, []byte("apiVersion: v1\nkind: Pod\n"), 0o644)
	if code, _, stderr := cfgRun(t, cfgNoEnv, "configure", "kubelet", "--config", bad, "--server", "https://s", "--match-image", "ghcr.io"); code != 1 || !strings.Contains(stderr, "not a file this command writes") {
		t.Errorf("a foreign file: %d %s", code, stderr)
	}
}

func TestUnifiedDiff(t *testing.T) {
	t.Parallel()
	old := []byte("a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n")
	new := []byte("a\nb\nc\nD\ne\nf\ng\nh\ni\nj\nk\n")
	got := unifiedDiff("f", old, new, true)
	want := "--- f\n+++ f\n@@ -1,10 +1,11 @@\n a\n b\n c\n-d\n+D\n e\n f\n g\n h\n i\n j\n+k\n"
	if got != want {
		t.Errorf("diff:\n%s\nwant:\n%s", got, want)
	}
	far := []byte("1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n")
	far2 := []byte("0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\nX\n")
	got = unifiedDiff("f", far, far2, true)
	if strings.Count(got, "@@ ") != 2 || !strings.Contains(got, "@@ -0,0 +1,1 @@") && !strings.Contains(got, "@@ -1,3 +1,4 @@") {
		t.Errorf("two hunks expected:\n%s", got)
	}
	if got := unifiedDiff("f", nil, []byte("x\n"), false); got != "--- /dev/null\n+++ f\n@@ -0,0 +1,1 @@\n+x\n" {
		t.Errorf("new file diff:\n%q", got)
	}
}
