package secret

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	awsCanary   = "canary-aws-secret-0c5e77f2a9"
	awsKeyID    = "AKIAFAKECANARY000001"
	ecrHost     = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
	ecrHostWest = "210987654321.dkr.ecr.us-west-2.amazonaws.com"
)

func TestParseECRHost(t *testing.T) {
	t.Parallel()
	priv := func(acct, region string, fips, dual bool) ECRRegistry {
		return ECRRegistry{Service: ECRPrivate, Account: acct, Region: region, FIPS: fips, DualStack: dual}
	}
	for _, tc := range []struct {
		host string
		want ECRRegistry
		ok   bool
	}{
		{"123456789012.dkr.ecr.us-east-1.amazonaws.com", priv("123456789012", "us-east-1", false, false), true},
		{"123456789012.dkr.ecr.us-east-1.amazonaws.com:443", priv("123456789012", "us-east-1", false, false), true},
		{"123456789012.DKR.ECR.EU-WEST-1.AMAZONAWS.COM", priv("123456789012", "eu-west-1", false, false), true},
		{"123456789012.dkr.ecr.us-east-1.amazonaws.com.", priv("123456789012", "us-east-1", false, false), true},
		{"123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", priv("123456789012", "us-gov-west-1", true, false), true},
		{"123456789012.dkr-ecr-fips.us-east-2.on.aws", priv("123456789012", "us-east-2", true, true), true},
		{"123456789012.dkr-ecr.us-west-2.on.aws", priv("123456789012", "us-west-2", false, true), true},
		{"123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", priv("123456789012", "cn-north-1", false, false), true},
		{"123456789012.dkr-ecr.cn-northwest-1.on.amazonwebservices.com.cn", priv("123456789012", "cn-northwest-1", false, true), true},
		{"123456789012.dkr.ecr.eusc-de-east-1.amazonaws.eu", priv("123456789012", "eusc-de-east-1", false, false), true},
		{"123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov", priv("123456789012", "us-iso-east-1", false, false), true},
		{"123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov", priv("123456789012", "us-isob-east-1", false, false), true},
		{"123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk", priv("123456789012", "eu-isoe-west-1", false, false), true},
		{"123456789012.dkr.ecr.us-isof-south-1.csp.hci.ic.gov", priv("123456789012", "us-isof-south-1", false, false), true},
		{"public.ecr.aws", ECRRegistry{Service: ECRPublic, Region: "us-east-1"}, true},
		{"public.ecr.aws:443", ECRRegistry{Service: ECRPublic, Region: "us-east-1"}, true},
		{"ecr-public.aws.com", ECRRegistry{Service: ECRPublic, Region: "us-east-1", DualStack: true}, true},

		{"123456789012.dkr.ecr.us-east-1.amazonaws.com:5000", ECRRegistry{}, false},
		{"12345678901.dkr.ecr.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"1234567890123.dkr.ecr.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"12345678901a.dkr.ecr.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.ecr.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr.us-east-1.amazonaws.org", ECRRegistry{}, false},
		{"123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.example", ECRRegistry{}, false},
		{"evil.example.123456789012.dkr.ecr.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr..amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr.us_east_1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr.-us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr-fipsx.us-east-1.amazonaws.com", ECRRegistry{}, false},
		{"123456789012.dkr.ecr.us-east-1", ECRRegistry{}, false},
		{"private.ecr.aws", ECRRegistry{}, false},
		{"public.ecr.aws.evil.example", ECRRegistry{}, false},
		{"docker.io", ECRRegistry{}, false},
		{"127.0.0.1:5000", ECRRegistry{}, false},
		{"", ECRRegistry{}, false},
	} {
		got, ok := ParseECRHost(tc.host)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseECRHost(%q) = %+v, %v; want %+v, %v", tc.host, got, ok, tc.want, tc.ok)
		}
	}
}

// ParseECRHost sees the canonical hosts ParseServerURL makes of whatever a
// client sends.
func TestParseECRHostFromServerURL(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		"https://" + ecrHost, ecrHost, ecrHost + "/team/app", "https://" + ecrHost + ":443/v2/",
	} {
		tg, err := ParseServerURL(in)
		if err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if r, ok := ParseECRHost(tg.Host); !ok || r.Account != "123456789012" || r.Region != "us-east-1" {
			t.Errorf("%s: %+v %v", in, r, ok)
		}
	}
}

func ecrSecret(t *testing.T, name string, regs ...string) Secret {
	return Secret{Project: DefaultProject, Name: name, Kind: ECR, Registries: pats(t, regs...)}
}

func TestValidateECR(t *testing.T) {
	t.Parallel()
	keys := &AWSValue{AccessKeyID: awsKeyID, SecretAccessKey: awsCanary}
	for _, tc := range []struct {
		name string
		regs []string
		v    Value
		want string // "" for valid
	}{
		{"default chain", []string{ecrHost}, Value{}, ""},
		{"keys", []string{ecrHost, ecrHostWest, "public.ecr.aws"}, Value{AWS: keys}, ""},
		{"role", []string{ecrHost}, Value{AWS: &AWSValue{RoleARN: "arn:aws:iam::123456789012:role/puller", ExternalID: "x"}}, ""},
		{"china role", []string{"123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"}, Value{AWS: &AWSValue{RoleARN: "arn:aws-cn:iam::123456789012:role/p"}}, ""},
		{"profile", []string{ecrHost + "/team"}, Value{AWS: &AWSValue{Profile: "prod"}}, ""},
		{"mirror with region", []string{"mirror.example:5000"}, Value{AWS: &AWSValue{Region: "eu-west-1"}}, ""},
		{"matching region", []string{ecrHost}, Value{AWS: &AWSValue{Region: "us-east-1"}}, ""},

		{"password", []string{ecrHost}, Value{Password: awsCanary}, "no username, password"},
		{"half keys", []string{ecrHost}, Value{AWS: &AWSValue{SecretAccessKey: awsCanary}}, "both an AWS access key id"},
		{"bad key id", []string{ecrHost}, Value{AWS: &AWSValue{AccessKeyID: awsCanary, SecretAccessKey: awsCanary}}, "access key id is not valid"},
		{"keys and profile", []string{ecrHost}, Value{AWS: &AWSValue{AccessKeyID: awsKeyID, SecretAccessKey: awsCanary, Profile: "p"}}, "not both"},
		{"bad role", []string{ecrHost}, Value{AWS: &AWSValue{RoleARN: "arn:aws:iam::123:user/x"}}, "role ARN"},
		{"external id alone", []string{ecrHost}, Value{AWS: &AWSValue{ExternalID: "x"}}, "needs a role ARN"},
		{"not ecr", []string{"ghcr.io"}, Value{}, "not an ECR host"},
		{"region mismatch", []string{ecrHost}, Value{AWS: &AWSValue{Region: "eu-west-1"}}, "is in region us-east-1"},
		{"bad region", []string{"mirror.example"}, Value{AWS: &AWSValue{Region: "Mars!"}}, "region"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := Validate(ecrSecret(t, "aws", tc.regs...), tc.v)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), awsCanary) {
				t.Fatalf("error leaks the secret key: %v", err)
			}
		})
	}
	// The other kinds take no AWS identity.
	if err := Validate(Secret{Project: DefaultProject, Name: "b", Kind: Basic, Registries: pats(t, "ghcr.io")}, Value{Username: "u", Password: "p", AWS: keys}); err == nil || !strings.Contains(err.Error(), "no AWS identity") {
		t.Error("basic secret with AWS fields accepted")
	}
}

func TestECRValueRedacted(t *testing.T) {
	t.Parallel()
	v := Value{AWS: &AWSValue{AccessKeyID: awsKeyID, SecretAccessKey: awsCanary}}
	req := ECRRequest{AWS: *v.AWS}
	tok := ECRToken{Password: canary}
	out := fmt.Sprintf("%v %+v %#v %v %+v %#v %v %#v %v %#v", v, v, v, v.AWS, *v.AWS, *v.AWS, req, req, tok, tok)
	for _, c := range []string{awsCanary, awsKeyID, canary} {
		if strings.Contains(out, c) {
			t.Fatalf("formatting leaks %q: %s", c, out)
		}
	}
}

// countingExchanger is an ECRExchanger that issues numbered passwords.
type countingExchanger struct {
	calls atomic.Int64
	life  time.Duration
	now   func() time.Time
	delay time.Duration
	mu    sync.Mutex
	err   error
	reqs  []ECRRequest
}

func (c *countingExchanger) Exchange(ctx context.Context, r ECRRequest) (ECRToken, error) {
	n := c.calls.Add(1)
	c.mu.Lock()
	c.reqs = append(c.reqs, r)
	err := c.err
	c.mu.Unlock()
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
	if err != nil {
		return ECRToken{}, err
	}
	now := time.Now
	if c.now != nil {
		now = c.now
	}
	life := c.life
	if life == 0 {
		life = 12 * time.Hour
	}
	return ECRToken{Username: "AWS", Password: fmt.Sprintf("%s-%d", canary, n), Expires: now().Add(life), Issued: now()}, nil
}

func (c *countingExchanger) setErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.err = err
}

func TestECRProviderResolve(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ex := &countingExchanger{}
	s, err := Open(t.TempDir(), WithProvider(ECR, NewECRProvider(ex)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, ecrSecret(t, "prod", ecrHost, ecrHostWest), Value{AWS: &AWSValue{AccessKeyID: awsKeyID, SecretAccessKey: awsCanary, RoleARN: "arn:aws:iam::123456789012:role/puller"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, ecrSecret(t, "mirror", "mirror.example:5000"), Value{AWS: &AWSValue{Region: "eu-central-1"}}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		url     string
		region  string
		account string
	}{
		{"https://" + ecrHost + "/team/app", "us-east-1", "123456789012"},
		{ecrHostWest, "us-west-2", "210987654321"},
		{"mirror.example:5000/app", "eu-central-1", ""},
	} {
		tg, err := ParseServerURL(tc.url)
		if err != nil {
			t.Fatal(err)
		}
		_, c, err := s.Resolve(ctx, "", tg)
		if err != nil {
			t.Fatalf("%s: %v", tc.url, err)
		}
		if c.Username != "AWS" || !strings.HasPrefix(c.Password, canary) || c.Expires.IsZero() {
			t.Fatalf("%s: credential %q %v", tc.url, c.Username, c.Expires)
		}
		r := ex.reqs[len(ex.reqs)-1]
		if r.Registry.Region != tc.region || r.Registry.Account != tc.account {
			t.Fatalf("%s: exchanged for %+v", tc.url, r.Registry)
		}
	}
	if r := ex.reqs[0]; r.AWS.RoleARN == "" || r.AWS.SecretAccessKey != awsCanary || r.SessionName != "pullsecret-default-prod" {
		t.Fatalf("request lost the identity: session %q role %q", r.SessionName, r.AWS.RoleARN)
	}
	// Each registry got its own token; asking again is served from cache.
	tg, _ := ParseServerURL(ecrHost)
	if _, _, err := s.Resolve(ctx, "", tg); err != nil {
		t.Fatal(err)
	}
	if n := ex.calls.Load(); n != 3 {
		t.Fatalf("%d exchanges, want 3", n)
	}
	// An AWS failure is not the helper's "not found".
	ex2 := &countingExchanger{err: &ECRError{Kind: ErrAWSAccessDenied, Detail: "nope"}}
	s2, _ := Open(s.Home(), WithProvider(ECR, NewECRProvider(ex2)))
	_, _, err = s2.Resolve(ctx, "", tg)
	if !errors.Is(err, ErrAWSAccessDenied) || errors.Is(err, ErrNotFound) {
		t.Fatalf("denied: %v", err)
	}
}

func TestECRProviderConcurrentOneExchange(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ex := &countingExchanger{delay: 50 * time.Millisecond}
	s, err := Open(t.TempDir(), WithProvider(ECR, NewECRProvider(ex)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, ecrSecret(t, "prod", ecrHost), Value{}); err != nil {
		t.Fatal(err)
	}
	tg, _ := ParseServerURL(ecrHost + "/app")
	var wg sync.WaitGroup
	pw := make([]string, 100)
	errs := make([]error, 100)
	for i := range 100 {
		wg.Go(func() {
			_, c, err := s.Resolve(ctx, "", tg)
			pw[i], errs[i] = c.Password, err
		})
	}
	wg.Wait()
	for i := range 100 {
		if errs[i] != nil || pw[i] != pw[0] {
			t.Fatalf("resolve %d: %v %q", i, errs[i], pw[i])
		}
	}
	if n := ex.calls.Load(); n != 1 {
		t.Fatalf("%d exchanges for 100 concurrent resolves, want 1", n)
	}
}

func TestServeECRExchangeRoundTrip(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
		kind error
	}{
		{"ok", nil, nil},
		{"denied", &ECRError{Kind: ErrAWSAccessDenied, Detail: "User x is not authorized"}, ErrAWSAccessDenied},
		{"throttled", &ECRError{Kind: ErrAWSThrottled, Detail: "slow down"}, ErrAWSThrottled},
		{"no credentials", &ECRError{Kind: ErrAWSNoCredentials, Detail: "none"}, ErrAWSNoCredentials},
		{"region", &ECRError{Kind: ErrAWSRegion, Detail: "r"}, ErrAWSRegion},
		{"plain", errors.New("boom"), ErrAWSFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ex := &countingExchanger{err: tc.err}
			in := `{"registry":{"Service":"ecr","Account":"123456789012","Region":"us-east-1"},"aws":{"access_key_id":"` + awsKeyID + `","secret_access_key":"` + awsCanary + `"}}`
			var out bytes.Buffer
			if err := ServeECRExchange(context.Background(), ex, strings.NewReader(in), &out); err != nil {
				t.Fatal(err)
			}
			if ex.reqs[0].AWS.SecretAccessKey != awsCanary || ex.reqs[0].Registry.Region != "us-east-1" {
				t.Fatal("request not decoded")
			}
			if strings.Contains(out.String(), awsCanary) {
				t.Fatal("response echoes the secret key")
			}
			// Decode the way ExecExchanger does.
			tok, err := decodeExchange(out.Bytes())
			if tc.kind == nil {
				if err != nil || !strings.HasPrefix(tok.Password, canary) {
					t.Fatalf("%v %q", err, tok.Password)
				}
				return
			}
			if !errors.Is(err, tc.kind) {
				t.Fatalf("got %v, want %v", err, tc.kind)
			}
		})
	}
	if err := ServeECRExchange(context.Background(), &countingExchanger{}, strings.NewReader(`{"aws":"`+awsCanary), &bytes.Buffer{}); err == nil || strings.Contains(err.Error(), awsCanary) {
		t.Fatalf("bad request: %v", err)
	}
}
