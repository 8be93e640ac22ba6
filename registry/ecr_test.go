package registry

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/ecr"
	"github.com/aws/aws-sdk-go-v2/service/ecrpublic"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

const (
	fakeKeyID  = "AKIAFAKEREGISTRY0001"
	fakeSecret = "fake-secret-key"
	fakeUser   = "arn:aws:iam::123456789012:user/ci"
)

type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func awsConfig(keyID, secretKey, region string) aws.Config {
	return aws.Config{Region: region, Credentials: credentials.NewStaticCredentialsProvider(keyID, secretKey, ""), RetryMaxAttempts: 1}
}

func ecrClient(f *FakeECR, cfg aws.Config) *ecr.Client {
	return ecr.NewFromConfig(cfg, func(o *ecr.Options) { o.BaseEndpoint = aws.String(f.URL()) })
}

// getToken calls GetAuthorizationToken and decodes the password.
func getToken(t *testing.T, c *ecr.Client) (string, time.Time, error) {
	t.Helper()
	out, err := c.GetAuthorizationToken(context.Background(), &ecr.GetAuthorizationTokenInput{})
	if err != nil {
		return "", time.Time{}, err
	}
	d := out.AuthorizationData[0]
	b, err := base64.StdEncoding.DecodeString(aws.ToString(d.AuthorizationToken))
	if err != nil {
		t.Fatal(err)
	}
	user, pw, _ := strings.Cut(string(b), ":")
	if user != "AWS" || !strings.HasPrefix(aws.ToString(d.ProxyEndpoint), "https://123456789012.dkr.ecr.") {
		t.Fatalf("token user %q, proxy endpoint %q", user, aws.ToString(d.ProxyEndpoint))
	}
	return pw, *d.ExpiresAt, nil
}

func apiCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

func TestFakeECRGetAuthorizationToken(t *testing.T) {
	t.Parallel()
	clk := &testClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	f := NewFakeECR(WithECRClock(clk.now), WithECRTokenTTL(time.Hour), WithECRRegion("us-east-1"))
	defer f.Close()
	f.AddUser(fakeKeyID, fakeSecret, fakeUser)

	c := ecrClient(f, awsConfig(fakeKeyID, fakeSecret, "us-east-1"))
	pw1, exp, err := getToken(t, c)
	if err != nil {
		t.Fatal(err)
	}
	if !exp.Equal(clk.now().Add(time.Hour)) {
		t.Fatalf("expires %s", exp)
	}
	pw2, _, _ := getToken(t, c)
	if pw1 == pw2 || !f.Valid(pw1) || !f.Valid(pw2) {
		t.Fatal("want a fresh, valid password per call")
	}
	if p, _ := f.PrincipalOf(pw1); p != fakeUser {
		t.Fatalf("principal %s", p)
	}
	clk.advance(time.Hour)
	if f.Valid(pw1) {
		t.Fatal("expired password still valid")
	}

	for _, tc := range []struct {
		name string
		cfg  aws.Config
		code string
	}{
		{"wrong secret", awsConfig(fakeKeyID, "nope", "us-east-1"), "InvalidSignatureException"},
		{"unknown key", awsConfig("AKIAFAKEUNKNOWN00001", fakeSecret, "us-east-1"), "UnrecognizedClientException"},
		{"wrong region", awsConfig(fakeKeyID, fakeSecret, "eu-west-1"), "InvalidSignatureException"},
	} {
		if _, _, err := getToken(t, ecrClient(f, tc.cfg)); apiCode(err) != tc.code {
			t.Errorf("%s: got %v, want %s", tc.name, err, tc.code)
		}
	}
	f.Fail(APIGetAuthorizationToken, "ThrottlingException", 1)
	if _, _, err := getToken(t, c); apiCode(err) != "ThrottlingException" {
		t.Fatalf("injected: %v", err)
	}
	if _, _, err := getToken(t, c); err != nil {
		t.Fatalf("after one injected failure: %v", err)
	}
	if n := f.Calls(APIGetAuthorizationToken); n != 7 {
		t.Fatalf("%d calls counted, want 7", n)
	}
	for _, r := range f.Requests() {
		if strings.Contains(r.AccessKeyID, fakeSecret) {
			t.Fatal("request log holds a secret key")
		}
	}
}

func TestFakeECRPublicAndAssumeRole(t *testing.T) {
	t.Parallel()
	f := NewFakeECR()
	defer f.Close()
	f.AddUser(fakeKeyID, fakeSecret, fakeUser)
	role := "arn:aws:iam::123456789012:role/puller"
	f.AddRole(role, "ext", fakeUser)
	cfg := awsConfig(fakeKeyID, fakeSecret, "us-east-1")

	pub := ecrpublic.NewFromConfig(cfg, func(o *ecrpublic.Options) { o.BaseEndpoint = aws.String(f.URL()) })
	out, err := pub.GetAuthorizationToken(context.Background(), &ecrpublic.GetAuthorizationTokenInput{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := base64.StdEncoding.DecodeString(aws.ToString(out.AuthorizationData.AuthorizationToken))
	if pw, ok := strings.CutPrefix(string(b), "AWS:"); !ok || !f.Valid(pw) || f.Calls(APIPublicGetAuthorizationToken) != 1 {
		t.Fatal("ECR Public token not valid")
	}

	stsc := sts.NewFromConfig(cfg, func(o *sts.Options) { o.BaseEndpoint = aws.String(f.URL()) })
	assume := func(ext string) (aws.Config, error) {
		p := stscreds.NewAssumeRoleProvider(stsc, role, func(o *stscreds.AssumeRoleOptions) {
			o.RoleSessionName = "test"
			if ext != "" {
				o.ExternalID = aws.String(ext)
			}
		})
		c := cfg.Copy()
		c.Credentials = aws.NewCredentialsCache(p)
		_, err := c.Credentials.Retrieve(context.Background())
		return c, err
	}
	if _, err := assume("wrong"); apiCode(err) != "AccessDenied" {
		t.Fatalf("wrong external id: %v", err)
	}
	rc, err := assume("ext")
	if err != nil {
		t.Fatal(err)
	}
	pw, _, err := getToken(t, ecrClient(f, rc))
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := f.PrincipalOf(pw); p != role {
		t.Fatalf("role session token of %s", p)
	}
}

// The paired registry takes user AWS with a currently valid password, so a
// pull works until the password expires.
func TestFakeECRRegistry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clk := &testClock{t: time.Now()}
	f := NewFakeECR(WithECRClock(clk.now), WithECRTokenTTL(time.Hour))
	defer f.Close()
	f.AddUser(fakeKeyID, fakeSecret, fakeUser)
	other := "AKIAFAKEOTHER0000001"
	f.AddUser(other, fakeSecret, "arn:aws:iam::123456789012:user/other")
	f.AllowRepos("arn:aws:iam::123456789012:user/other", "team-b")
	reg, err := StartECR(ctx, f)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if _, err := reg.SeedRandom(ctx, "team/app", "v1"); err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(reg.Ref("team/app", "v1"), name.Insecure)
	pull := func(pw string) error {
		_, err := remote.Image(ref, remote.WithAuth(&authn.Basic{Username: "AWS", Password: pw}))
		return err
	}
	status := func(err error) int {
		switch {
		case err == nil:
			return http.StatusOK
		case strings.Contains(err.Error(), "UNAUTHORIZED"):
			return http.StatusUnauthorized
		case strings.Contains(err.Error(), "DENIED"):
			return http.StatusForbidden
		}
		return 0
	}
	pw, _, err := getToken(t, ecrClient(f, awsConfig(fakeKeyID, fakeSecret, "us-east-1")))
	if err != nil {
		t.Fatal(err)
	}
	otherPw, _, err := getToken(t, ecrClient(f, awsConfig(other, fakeSecret, "us-east-1")))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		pw   string
		want int
	}{
		{"valid", pw, http.StatusOK},
		{"never issued", "fake-ecr-nope", http.StatusUnauthorized},
		{"limited principal", otherPw, http.StatusForbidden},
	} {
		if got := status(pull(tc.pw)); got != tc.want {
			t.Errorf("%s: %d, want %d (%v)", tc.name, got, tc.want, pull(tc.pw))
		}
	}
	clk.advance(time.Hour)
	if got := status(pull(pw)); got != http.StatusUnauthorized {
		t.Fatalf("expired password: %d", got)
	}
	req, _ := http.NewRequest("GET", reg.URL()+"/v2/", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
		t.Fatalf("challenge: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}
