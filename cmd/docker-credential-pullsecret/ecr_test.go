package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

// Canaries: the AWS secret key is in the sealed store only; the ECR
// passwords the fake issues (fake.Issued) appear only in a successful get's
// stdout, the credential response.
const (
	keyID     = "AKIAFAKEHELPER000001"
	canaryKey = "canary-aws-secret-helper-3f9a1c"
	userARN   = "arn:aws:iam::123456789012:user/ci"
	roleA     = "arn:aws:iam::123456789012:role/team-a"
	roleB     = "arn:aws:iam::123456789012:role/team-b"
	ecrHost   = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
)

// ecrWorld is a fake AWS, a pullsecret home and the built binaries.
type ecrWorld struct {
	t    *testing.T
	bin  string
	home string
	fake *registry.FakeECR
	env  []string

	mu      sync.Mutex
	results []result
}

type result struct {
	stdout, stderr string
	code           int
	took           time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout: %s\nstderr: %s", r.code, r.took.Round(time.Millisecond), r.stdout, r.stderr)
}

func newECRWorld(t *testing.T, opts ...registry.FakeECROption) *ecrWorld {
	t.Helper()
	// Both programs in one folder: the helper finds pullsecret next to
	// itself, as an install puts them.
	w := &ecrWorld{t: t, bin: testbin.Build(t, "docker-credential-pullsecret", "pullsecret"), home: filepath.Join(t.TempDir(), "home")}
	w.fake = registry.NewFakeECR(opts...)
	t.Cleanup(w.fake.Close)
	w.fake.AddUser(keyID, canaryKey, userARN)
	w.fake.AddRole(roleA, "ext-a", userARN)
	w.fake.AddRole(roleB, "")
	aws := t.TempDir()
	// A minimal environment: nothing of the machine's AWS setup leaks in.
	w.env = []string{
		"PATH=/usr/local/bin:/usr/bin:/bin",
		"HOME=" + aws,
		"PULLSECRET_HOME=" + w.home,
		"AWS_CONFIG_FILE=" + filepath.Join(aws, "config"),
		"AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(aws, "credentials"),
		"AWS_ENDPOINT_URL_ECR=" + w.fake.URL(),
		"AWS_ENDPOINT_URL_ECR_PUBLIC=" + w.fake.URL(),
		"AWS_ENDPOINT_URL_STS=" + w.fake.URL(),
		"AWS_EC2_METADATA_DISABLED=true",
	}
	return w
}

func (w *ecrWorld) create(name string, a *secret.AWSValue, regs ...string) {
	w.t.Helper()
	s, err := secret.Open(w.home)
	if err != nil {
		w.t.Fatal(err)
	}
	var ps []secret.Pattern
	for _, r := range regs {
		p, err := secret.ParsePattern(r)
		if err != nil {
			w.t.Fatal(err)
		}
		ps = append(ps, p)
	}
	kind := secret.ECR
	v := secret.Value{AWS: a}
	if a == nil {
		kind, v = secret.Basic, secret.Value{Username: "bot", Password: "static-pw"}
	}
	if _, err := s.Create(context.Background(), secret.Secret{Name: name, Kind: kind, Registries: ps}, v); err != nil {
		w.t.Fatal(err)
	}
}

// get runs the helper's get as a client does.
func (w *ecrWorld) get(serverURL string, env ...string) result {
	cmd := exec.Command(filepath.Join(w.bin, "docker-credential-pullsecret"), "get")
	cmd.Stdin = strings.NewReader(serverURL + "\n")
	cmd.Env = append(append([]string{}, w.env...), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	if err != nil {
		r.code = -1
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		}
	}
	w.mu.Lock()
	w.results = append(w.results, r)
	w.mu.Unlock()
	return r
}

// password parses a successful get.
func (w *ecrWorld) password(r result) string {
	w.t.Helper()
	var c struct{ Username, Secret string }
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &c) != nil || c.Username != "AWS" || c.Secret == "" {
		w.t.Fatalf("get failed: %s", r)
	}
	return c.Secret
}

// checkCanaries: the secret key nowhere in the clear, the ECR passwords in
// nothing but a credential response.
func (w *ecrWorld) checkCanaries() {
	w.t.Helper()
	issued := w.fake.Issued()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range w.results {
		for _, c := range append([]string{canaryKey}, issued...) {
			if strings.Contains(r.stderr, c) {
				w.t.Errorf("canary in stderr: %s", r)
			}
			if r.code != 0 && strings.Contains(r.stdout, c) {
				w.t.Errorf("canary in an error: %s", r)
			}
		}
		if strings.Contains(r.stdout, canaryKey) {
			w.t.Errorf("AWS secret key in stdout: %s", r)
		}
	}
	filepath.WalkDir(w.home, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, _ := os.ReadFile(path)
		for _, c := range append([]string{canaryKey, keyID, roleA, roleB, "ext-a"}, issued...) {
			if bytes.Contains(b, []byte(c)) {
				w.t.Errorf("%s holds %q in the clear", path, c)
			}
		}
		if fi, _ := d.Info(); fi.Mode().Perm()&0o077 != 0 {
			w.t.Errorf("%s has mode %v", path, fi.Mode())
		}
		return nil
	})
}

func keys() *secret.AWSValue { return &secret.AWSValue{AccessKeyID: keyID, SecretAccessKey: canaryKey} }

// 100 helper processes started at once on a cold cache make one AWS call.
func TestHelperECRConcurrentProcesses(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t)
	w.create("prod", keys(), ecrHost)
	var wg sync.WaitGroup
	res := make([]result, 100)
	for i := range res {
		wg.Go(func() { res[i] = w.get("https://" + ecrHost + "/team/app") })
	}
	wg.Wait()
	first := w.password(res[0])
	for _, r := range res {
		if pw := w.password(r); pw != first {
			t.Fatal("processes got different tokens")
		}
	}
	if !w.fake.Valid(first) {
		t.Fatal("token not valid at the fake registry")
	}
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Fatalf("%d GetAuthorizationToken calls from 100 processes, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(w.home, "ecr-tokens.json")); err != nil {
		t.Fatal(err)
	}
	w.checkCanaries()
}

// Real expiry, with a fake whose tokens live 6 s: a token is refreshed when
// less than half its life is left; a failed refresh serves the old token
// while it is valid, with a warning; an expired token is never served.
func TestHelperECRRefreshAndExpiry(t *testing.T) {
	t.Parallel()
	const life = 6 * time.Second
	w := newECRWorld(t, registry.WithECRTokenTTL(life))
	w.create("prod", keys(), ecrHost)
	calls := func() int { return w.fake.Calls(registry.APIGetAuthorizationToken) }

	start := time.Now()
	pw1 := w.password(w.get(ecrHost))
	if pw := w.password(w.get(ecrHost)); pw != pw1 || calls() != 1 {
		t.Fatalf("warm get: %d calls", calls())
	}
	// Past half the life: the refresh fails, the old token is served.
	time.Sleep(time.Until(start.Add(life/2 + 500*time.Millisecond)))
	w.fake.Fail(registry.APIGetAuthorizationToken, "AccessDeniedException", -1)
	r := w.get(ecrHost)
	if pw := w.password(r); pw != pw1 || calls() != 2 {
		t.Fatalf("stale token not served: %d calls\n%s", calls(), r)
	}
	if !strings.Contains(r.stderr, "ECR token refresh failed") || !strings.Contains(r.stderr, "access denied") {
		t.Fatalf("no warning on stderr: %s", r)
	}
	// Expired, refresh still failing: an error, never the old token.
	time.Sleep(time.Until(start.Add(life + 300*time.Millisecond)))
	r = w.get(ecrHost)
	if r.code == 0 || strings.Contains(r.stdout, pw1) || !strings.Contains(r.stdout, "access denied by AWS IAM") {
		t.Fatalf("expired token served or unclear error: %s", r)
	}
	// AWS answers again: a fresh token, then a successful refresh near expiry.
	w.fake.ClearFailures()
	start = time.Now()
	pw2 := w.password(w.get(ecrHost))
	if pw2 == pw1 || !w.fake.Valid(pw2) {
		t.Fatal("no fresh token after recovery")
	}
	n := calls()
	time.Sleep(time.Until(start.Add(life/2 + 500*time.Millisecond)))
	pw3 := w.password(w.get(ecrHost))
	if pw3 == pw2 || calls() != n+1 || !w.fake.Valid(pw3) {
		t.Fatalf("near-expiry refresh: %d calls (was %d)", calls(), n)
	}
	w.checkCanaries()
}

// blackHole accepts connections and never answers.
func blackHole(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String()
}

// No AWS credentials anywhere, metadata endpoints that never answer: the
// helper fails in well under 3 s and says what is wrong.
func TestHelperECRNoCredentials(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t)
	w.create("prod", nil, "ghcr.io")
	w.create("aws", &secret.AWSValue{}, ecrHost)
	for _, env := range [][]string{
		{"AWS_EC2_METADATA_DISABLED=false", "AWS_EC2_METADATA_SERVICE_ENDPOINT=" + blackHole(t)},
		{"AWS_EC2_METADATA_DISABLED=false", "AWS_EC2_METADATA_SERVICE_ENDPOINT=" + blackHole(t), "AWS_CONTAINER_CREDENTIALS_FULL_URI=" + blackHole(t) + "/creds"},
	} {
		r := w.get(ecrHost, env...)
		if r.code != 1 || !strings.Contains(r.stdout, "no AWS credentials") || !strings.Contains(r.stdout, "--aws-access-key-id") {
			t.Fatalf("want a clear error: %s", r)
		}
		if r.took > 3*time.Second {
			t.Fatalf("took %s", r.took)
		}
		t.Logf("%s", r)
	}
	if w.fake.Calls(registry.APIGetAuthorizationToken) != 0 {
		t.Fatal("called ECR without credentials")
	}
}

// Distinct, clear errors; only an uncovered registry is "not found".
func TestHelperECRErrors(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t, registry.WithECRRegion("us-east-1"))
	w.create("prod", keys(), ecrHost)
	w.create("west", keys(), "123456789012.dkr.ecr.eu-west-1.amazonaws.com")
	w.create("badkey", &secret.AWSValue{AccessKeyID: "AKIAFAKEUNKNOWN00001", SecretAccessKey: canaryKey}, "123456789012.dkr.ecr.us-east-1.amazonaws.com/other")
	for _, tc := range []struct {
		name, url, want string
		fail            string
	}{
		{"not covered", "123456789012.dkr.ecr.us-east-2.amazonaws.com", "credentials not found in native keychain", ""},
		{"access denied", ecrHost + "/app", "access denied by AWS IAM", "AccessDeniedException"},
		{"throttled", ecrHost + "/app", "throttled by AWS", "ThrottlingException"},
		{"wrong region", "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "wrong AWS region", ""},
		{"bad key", ecrHost + "/other/app", "AWS rejected the credentials", ""},
	} {
		if tc.fail != "" {
			w.fake.Fail(registry.APIGetAuthorizationToken, tc.fail, -1)
		}
		r := w.get(tc.url, "PULLSECRET_ECR_CACHE=off")
		w.fake.ClearFailures()
		if r.code != 1 || !strings.Contains(r.stdout, tc.want) {
			t.Errorf("%s: want %q: %s", tc.name, tc.want, r)
		}
		if tc.want != "credentials not found in native keychain" && strings.Contains(r.stdout, "not found") {
			t.Errorf("%s: an AWS failure reads as not found: %s", tc.name, r)
		}
	}
	w.checkCanaries()
}

// Two secrets naming two roles for two registries each get their role's
// token, through the disk cache.
func TestHelperECRTwoRoles(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t)
	hostB := "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
	a := keys()
	a.RoleARN, a.ExternalID = roleA, "ext-a"
	w.create("team-a", a, ecrHost)
	b := keys()
	b.RoleARN = roleB
	w.create("team-b", b, hostB)
	for range 2 {
		for _, tc := range []struct{ host, role string }{{ecrHost, roleA}, {hostB, roleB}} {
			pw := w.password(w.get(tc.host))
			if p, _ := w.fake.PrincipalOf(pw); p != tc.role {
				t.Fatalf("%s: token of %s, want %s", tc.host, p, tc.role)
			}
		}
	}
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 2 {
		t.Fatalf("%d calls, want 2 (one per role, then cached)", n)
	}
	w.checkCanaries()
}

// PULLSECRET_ECR_CACHE=off: no file, a call per get.
func TestHelperECRCacheOff(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t)
	w.create("prod", keys(), ecrHost)
	pw1 := w.password(w.get(ecrHost, "PULLSECRET_ECR_CACHE=off"))
	pw2 := w.password(w.get(ecrHost, "PULLSECRET_ECR_CACHE=off"))
	if pw1 == pw2 || w.fake.Calls(registry.APIGetAuthorizationToken) != 2 {
		t.Fatalf("cache off: %d calls", w.fake.Calls(registry.APIGetAuthorizationToken))
	}
	if _, err := os.Stat(filepath.Join(w.home, "ecr-tokens.json")); err == nil {
		t.Fatal("cache file written with the cache off")
	}
}

// A secret that is not ECR never starts the AWS exchange program.
func TestHelperNonECRStaysLocal(t *testing.T) {
	t.Parallel()
	w := newECRWorld(t)
	w.create("ghcr", nil, "ghcr.io")
	w.create("aws", keys(), ecrHost)
	missing := "PULLSECRET_ECR_EXCHANGER=" + filepath.Join(t.TempDir(), "nope")
	r := w.get("ghcr.io/team/app", missing)
	if r.code != 0 || !strings.Contains(r.stdout, "static-pw") {
		t.Fatalf("basic secret: %s", r)
	}
	r = w.get(ecrHost, missing)
	if r.code != 1 || !strings.Contains(r.stdout, "ECR token exchange failed") {
		t.Fatalf("missing exchange program: %s", r)
	}
	// Found next to the helper, not on PATH.
	r = w.get(ecrHost, "PATH=/nonexistent")
	w.password(r)
}

// execHelper is an authn.Helper that runs the helper binary, as
// go-containerregistry's clients do with credHelpers.
type execHelper struct{ w *ecrWorld }

func (h execHelper) Get(serverURL string) (string, string, error) {
	r := h.w.get(serverURL)
	if r.code != 0 {
		return "", "", fmt.Errorf("helper: %s", strings.TrimSpace(r.stdout))
	}
	var c struct{ Username, Secret string }
	if err := json.Unmarshal([]byte(r.stdout), &c); err != nil {
		return "", "", err
	}
	return c.Username, c.Secret, nil
}

// A pull with go-containerregistry through the helper from a registry that
// takes ECR tokens (user AWS, a password the fake issued and that has not
// expired). The registry is on 127.0.0.1, as an ECR mirror would be, so
// the secret names its region.
func TestHelperECRPull(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	w := newECRWorld(t)
	reg, err := registry.StartECR(ctx, w.fake)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := reg.SeedRandom(ctx, "team/app", "v1", registry.Layers(2))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	ref, err := name.ParseReference(reg.Ref("team/app", "v1"), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := remote.Image(ref); err == nil || !strings.Contains(err.Error(), "401") && !strings.Contains(strings.ToLower(err.Error()), "unauthorized") {
		t.Fatalf("anonymous pull: %v", err)
	}
	a := keys()
	a.Region = "us-east-1"
	w.create("mirror", a, reg.Addr())
	kc := authn.NewKeychainFromHelper(execHelper{w})
	got, err := remote.Image(ref, remote.WithAuthFromKeychain(kc), remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := got.Digest(); d != want {
		t.Fatalf("digest %s, want %s", d, want)
	}
	layers, err := got.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := bytes.NewBuffer(nil).ReadFrom(rc); err != nil {
			t.Fatal(err)
		}
		rc.Close()
	}
	if n := w.fake.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Fatalf("%d GetAuthorizationToken calls for one pull, want 1", n)
	}
	w.checkCanaries()
}
