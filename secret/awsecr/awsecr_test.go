package awsecr

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/registry"
	"github.com/pullsecret/pullsecret/secret"
)

const (
	keyID     = "AKIAFAKEUSER00000001"
	canaryKey = "canary-aws-secret-5b0e3c91d7"
	userARN   = "arn:aws:iam::123456789012:user/ci"
	roleA     = "arn:aws:iam::123456789012:role/team-a"
	roleB     = "arn:aws:iam::123456789012:role/team-b"
	host      = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
)

func newFake(t *testing.T, opts ...registry.FakeECROption) *registry.FakeECR {
	t.Helper()
	f := registry.NewFakeECR(opts...)
	t.Cleanup(f.Close)
	f.AddUser(keyID, canaryKey, userARN)
	f.AddRole(roleA, "ext-a", userARN)
	f.AddRole(roleB, "")
	return f
}

func exchanger(f *registry.FakeECR) *Exchanger {
	return New(WithECREndpoint(f.URL()), WithECRPublicEndpoint(f.URL()), WithSTSEndpoint(f.URL()))
}

var (
	usEast = secret.ECRRegistry{Service: secret.ECRPrivate, Account: "123456789012", Region: "us-east-1"}
	keys   = secret.AWSValue{AccessKeyID: keyID, SecretAccessKey: canaryKey}
)

func TestExchange(t *testing.T) {
	t.Parallel()
	withRole := func(role, ext string) secret.AWSValue {
		a := keys
		a.RoleARN, a.ExternalID = role, ext
		return a
	}
	for _, tc := range []struct {
		name      string
		reg       secret.ECRRegistry
		aws       secret.AWSValue
		fail      [3]any // api, code, times
		strict    string // fake's region
		principal string // who the password belongs to; "" when an error is wanted
		err       error
		calls     int // GetAuthorizationToken calls, when > 0
	}{
		{name: "keys", reg: usEast, aws: keys, principal: userARN, calls: 1},
		{name: "public", reg: secret.ECRRegistry{Service: secret.ECRPublic, Region: "us-east-1"}, aws: keys, principal: userARN},
		{name: "fips endpoint override", reg: secret.ECRRegistry{Service: secret.ECRPrivate, Account: "123456789012", Region: "us-gov-west-1", FIPS: true}, aws: keys, principal: userARN},
		{name: "role with external id", reg: usEast, aws: withRole(roleA, "ext-a"), principal: roleA},
		{name: "role, any caller", reg: usEast, aws: withRole(roleB, ""), principal: roleB},
		{name: "wrong external id", reg: usEast, aws: withRole(roleA, "nope"), err: secret.ErrAWSAccessDenied},
		{name: "unknown role", reg: usEast, aws: withRole("arn:aws:iam::123456789012:role/none", ""), err: secret.ErrAWSAccessDenied},
		{name: "access denied", reg: usEast, aws: keys, fail: [3]any{registry.APIGetAuthorizationToken, "AccessDeniedException", -1}, err: secret.ErrAWSAccessDenied},
		{name: "throttled", reg: usEast, aws: keys, fail: [3]any{registry.APIGetAuthorizationToken, "ThrottlingException", -1}, err: secret.ErrAWSThrottled, calls: DefaultMaxAttempts},
		{name: "throttled once, retried", reg: usEast, aws: keys, fail: [3]any{registry.APIGetAuthorizationToken, "ThrottlingException", 1}, principal: userARN, calls: 2},
		{name: "sts throttled", reg: usEast, aws: withRole(roleB, ""), fail: [3]any{registry.APIAssumeRole, "Throttling", -1}, err: secret.ErrAWSThrottled},
		{name: "wrong secret key", reg: usEast, aws: secret.AWSValue{AccessKeyID: keyID, SecretAccessKey: canaryKey + "x"}, err: secret.ErrAWSInvalidCredentials},
		{name: "unknown key id", reg: usEast, aws: secret.AWSValue{AccessKeyID: "AKIAFAKEUNKNOWN00001", SecretAccessKey: canaryKey}, err: secret.ErrAWSInvalidCredentials},
		{name: "wrong region", reg: secret.ECRRegistry{Service: secret.ECRPrivate, Account: "123456789012", Region: "eu-west-1"}, aws: keys, strict: "us-east-1", err: secret.ErrAWSRegion},
		{name: "right region", reg: usEast, aws: keys, strict: "us-east-1", principal: userARN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var opts []registry.FakeECROption
			if tc.strict != "" {
				opts = append(opts, registry.WithECRRegion(tc.strict))
			}
			f := newFake(t, opts...)
			if tc.fail[0] != nil {
				f.Fail(tc.fail[0].(string), tc.fail[1].(string), tc.fail[2].(int))
			}
			start := time.Now()
			tok, err := exchanger(f).Exchange(context.Background(), secret.ECRRequest{Registry: tc.reg, AWS: tc.aws, SessionName: "pullsecret-default-test"})
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("got %v, want %v", err, tc.err)
				}
				if strings.Contains(err.Error(), canaryKey) {
					t.Fatalf("error leaks the secret key: %v", err)
				}
				var ee *secret.ECRError
				if !errors.As(err, &ee) || ee.Detail == "" {
					t.Fatalf("error without detail: %v", err)
				}
				t.Logf("%s (%s)", err, time.Since(start).Round(time.Millisecond))
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if tok.Username != "AWS" || !f.Valid(tok.Password) {
					t.Fatalf("token %q not valid at the fake", tok.Username)
				}
				if p, _ := f.PrincipalOf(tok.Password); p != tc.principal {
					t.Fatalf("token of %s, want %s", p, tc.principal)
				}
				if d := time.Until(tok.Expires); d < 11*time.Hour || d > 12*time.Hour {
					t.Fatalf("expires in %s", d)
				}
			}
			api := registry.APIGetAuthorizationToken
			if tc.reg.Service == secret.ECRPublic {
				api = registry.APIPublicGetAuthorizationToken
			}
			if tc.calls > 0 && f.Calls(api) != tc.calls {
				t.Fatalf("%d calls, want %d", f.Calls(api), tc.calls)
			}
		})
	}
}

func newStore(t *testing.T, f *registry.FakeECR) *secret.Store {
	t.Helper()
	s, err := secret.Open(t.TempDir(), secret.WithProvider(secret.ECR, secret.NewECRProvider(exchanger(f))))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func create(t *testing.T, s *secret.Store, name string, a secret.AWSValue, regs ...string) {
	t.Helper()
	var ps []secret.Pattern
	for _, r := range regs {
		p, err := secret.ParsePattern(r)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	if _, err := s.Create(context.Background(), secret.Secret{Name: name, Kind: secret.ECR, Registries: ps}, secret.Value{AWS: &a}); err != nil {
		t.Fatal(err)
	}
}

// 100 concurrent pulls through the server's provider make one AWS call.
func TestResolveConcurrentOneCall(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	s := newStore(t, f)
	create(t, s, "prod", keys, host)
	tg, _ := secret.ParseServerURL(host + "/team/app")
	var wg sync.WaitGroup
	pw := make([]string, 100)
	errs := make([]error, 100)
	for i := range 100 {
		wg.Go(func() {
			_, c, err := s.Resolve(context.Background(), "", tg)
			pw[i], errs[i] = c.Password, err
		})
	}
	wg.Wait()
	for i := range 100 {
		if errs[i] != nil || pw[i] != pw[0] || !f.Valid(pw[i]) {
			t.Fatalf("resolve %d: %v", i, errs[i])
		}
	}
	if n := f.Calls(registry.APIGetAuthorizationToken); n != 1 {
		t.Fatalf("%d GetAuthorizationToken calls for 100 concurrent resolves, want 1", n)
	}
}

// Two secrets naming two roles for two registries each get their own role's
// token, and the fake registry enforces it.
func TestTwoRolesTwoRegistries(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	s := newStore(t, f)
	hostB := "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
	a := keys
	a.RoleARN, a.ExternalID = roleA, "ext-a"
	create(t, s, "team-a", a, host)
	b := keys
	b.RoleARN = roleB
	create(t, s, "team-b", b, hostB)
	for _, tc := range []struct{ host, role string }{{host, roleA}, {hostB, roleB}, {host, roleA}} {
		tg, _ := secret.ParseServerURL(tc.host)
		_, c, err := s.Resolve(context.Background(), "", tg)
		if err != nil {
			t.Fatal(err)
		}
		if p, _ := f.PrincipalOf(c.Password); p != tc.role {
			t.Fatalf("%s: token of %s, want %s", tc.host, p, tc.role)
		}
	}
	if n := f.Calls(registry.APIAssumeRole); n != 2 {
		t.Fatalf("%d AssumeRole calls, want 2", n)
	}
	for _, r := range f.Requests() {
		if r.API == registry.APIGetAuthorizationToken && (r.Principal != roleA && r.Principal != roleB) {
			t.Fatalf("GetAuthorizationToken signed by %s, not a role session", r.Principal)
		}
	}
}

// blackHole accepts connections and never answers, like a metadata address
// that a firewall swallows.
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

// noAWSEnv empties every AWS source of the default chain but the metadata
// endpoints.
func noAWSEnv(t *testing.T) {
	dir := t.TempDir()
	for _, k := range os.Environ() {
		if name, _, _ := strings.Cut(k, "="); strings.HasPrefix(name, "AWS_") {
			t.Setenv(name, "")
			os.Unsetenv(name)
		}
	}
	t.Setenv("HOME", dir)
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
}

// With no credentials anywhere and metadata endpoints that never answer,
// the exchange fails in about a second with a clear message. (The env is
// changed, so not parallel.)
func TestNoCredentialsFailsFast(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  func(t *testing.T)
	}{
		{"instance metadata", func(t *testing.T) { t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", blackHole(t)) }},
		{"container metadata", func(t *testing.T) {
			t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", blackHole(t)+"/creds")
			t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", blackHole(t))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			noAWSEnv(t)
			tc.env(t)
			f := newFake(t)
			start := time.Now()
			_, err := exchanger(f).Exchange(context.Background(), secret.ECRRequest{Registry: usEast})
			took := time.Since(start)
			if !errors.Is(err, secret.ErrAWSNoCredentials) {
				t.Fatalf("got %v", err)
			}
			if took > 3*time.Second {
				t.Fatalf("took %s", took)
			}
			if !strings.Contains(err.Error(), "--aws-access-key-id") {
				t.Fatalf("message says nothing of what to do: %v", err)
			}
			if f.Calls(registry.APIGetAuthorizationToken) != 0 {
				t.Fatal("called ECR without credentials")
			}
			t.Logf("%s: %v", took.Round(time.Millisecond), err)
		})
	}
}

// The SDK's own variables: keys from the environment, endpoints from
// AWS_ENDPOINT_URL_ECR / _STS, and a profile from the shared files.
func TestDefaultChainFromEnv(t *testing.T) {
	noAWSEnv(t)
	f := newFake(t)
	t.Setenv("AWS_ENDPOINT_URL_ECR", f.URL())
	t.Setenv("AWS_ENDPOINT_URL_STS", f.URL())
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	ex := New()

	t.Setenv("AWS_ACCESS_KEY_ID", keyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", canaryKey)
	tok, err := ex.Exchange(context.Background(), secret.ECRRequest{Registry: usEast})
	if p, _ := f.PrincipalOf(tok.Password); err != nil || p != userARN {
		t.Fatalf("env keys: %v (%s)", err, p)
	}
	tok, err = ex.Exchange(context.Background(), secret.ECRRequest{Registry: usEast, AWS: secret.AWSValue{RoleARN: roleB}})
	if p, _ := f.PrincipalOf(tok.Password); err != nil || p != roleB {
		t.Fatalf("env keys + role: %v (%s)", err, p)
	}
	os.Unsetenv("AWS_ACCESS_KEY_ID")
	os.Unsetenv("AWS_SECRET_ACCESS_KEY")

	creds := "[ci]\naws_access_key_id = " + keyID + "\naws_secret_access_key = " + canaryKey + "\n"
	if err := os.WriteFile(os.Getenv("AWS_SHARED_CREDENTIALS_FILE"), []byte(creds), 0o600); err != nil {
		t.Fatal(err)
	}
	tok, err = ex.Exchange(context.Background(), secret.ECRRequest{Registry: usEast, AWS: secret.AWSValue{Profile: "ci"}})
	if p, _ := f.PrincipalOf(tok.Password); err != nil || p != userARN {
		t.Fatalf("profile: %v (%s)", err, p)
	}
	_, err = ex.Exchange(context.Background(), secret.ECRRequest{Registry: usEast, AWS: secret.AWSValue{Profile: "missing"}})
	if !errors.Is(err, secret.ErrAWSNoCredentials) || !strings.Contains(err.Error(), `"missing"`) {
		t.Fatalf("missing profile: %v", err)
	}
}
