package secret

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/exec"
	"strings"
	"time"
)

// This file holds everything about ECR secrets that does not need the AWS
// SDK: host parsing, validation, the provider, its errors and the exchange
// protocol. The SDK call itself lives in package secret/awsecr, because
// merely linking the SDK (and net/http) costs every process that imports
// it about 2.7 ms at start-up, measured: the credential helper, which
// starts once per pull, must not pay that for secrets that are not ECR, nor
// for an ECR token it already holds. See ExecExchanger.

// ECRService is the API that issues a registry's tokens.
type ECRService string

const (
	// ECRPrivate is Amazon ECR (service/ecr), one registry per account and
	// region.
	ECRPrivate ECRService = "ecr"
	// ECRPublic is Amazon ECR Public (service/ecrpublic), whose API is in
	// us-east-1 only.
	ECRPublic ECRService = "ecr-public"
)

// ECRUsername is the user name of every ECR registry token.
const ECRUsername = "AWS"

// ECRRegistry is what an ECR host name says about its registry.
type ECRRegistry struct {
	Service   ECRService
	Account   string // 12 digits; "" for ECR Public or a non-ECR host
	Region    string
	FIPS      bool // dkr.ecr-fips / dkr-ecr-fips: use the FIPS API endpoint
	DualStack bool // on.aws and ecr-public.aws.com: use the dual-stack API endpoint
}

func (r ECRRegistry) String() string {
	if r.Service == ECRPublic {
		return "ECR Public"
	}
	if r.Account == "" {
		return "ECR in " + r.Region
	}
	return "ECR registry " + r.Account + " in " + r.Region
}

// ecrSuffixes are the DNS suffixes of ECR registries: the commercial,
// China, European Sovereign Cloud, dual-stack and isolated partitions.
var ecrSuffixes = []struct {
	suffix    string
	dualStack bool
}{
	{"amazonaws.com", false},
	{"amazonaws.com.cn", false},
	{"amazonaws.eu", false},
	{"on.aws", true},
	{"on.amazonwebservices.com.cn", true},
	{"c2s.ic.gov", false},
	{"sc2s.sgov.gov", false},
	{"cloud.adc-e.uk", false},
	{"csp.hci.ic.gov", false},
}

// ParseECRHost recognises an Amazon ECR registry host:
//
//	ACCOUNT.dkr.ecr[-fips].REGION.amazonaws.com[.cn]   (and .amazonaws.eu, the iso partitions)
//	ACCOUNT.dkr-ecr[-fips].REGION.on.aws               (dual-stack)
//	public.ecr.aws, ecr-public.aws.com                 (ECR Public, API in us-east-1)
//
// that is, the pattern ^(\d{12})\.dkr[.-]ecr(-fips)?\.([a-z0-9-]+)\.(suffix)$
// of the reference helper, written out because the regexp package's
// start-up cost would be paid by every helper process. A port of 443 is
// allowed; any other is not an ECR host.
func ParseECRHost(host string) (ECRRegistry, bool) {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if h, port, ok := strings.Cut(host, ":"); ok {
		if port != "443" {
			return ECRRegistry{}, false
		}
		host = h
	}
	switch host {
	case "public.ecr.aws":
		return ECRRegistry{Service: ECRPublic, Region: "us-east-1"}, true
	case "ecr-public.aws.com":
		return ECRRegistry{Service: ECRPublic, Region: "us-east-1", DualStack: true}, true
	}
	account, rest, ok := strings.Cut(host, ".")
	if !ok || !isAccountID(account) {
		return ECRRegistry{}, false
	}
	var fips bool
	switch {
	case strings.HasPrefix(rest, "dkr.ecr."), strings.HasPrefix(rest, "dkr-ecr."):
		rest = rest[len("dkr.ecr."):]
	case strings.HasPrefix(rest, "dkr.ecr-fips."), strings.HasPrefix(rest, "dkr-ecr-fips."):
		rest, fips = rest[len("dkr.ecr-fips."):], true
	default:
		return ECRRegistry{}, false
	}
	region, suffix, ok := strings.Cut(rest, ".")
	if !ok || !isRegion(region) {
		return ECRRegistry{}, false
	}
	for _, s := range ecrSuffixes {
		if suffix == s.suffix {
			return ECRRegistry{Service: ECRPrivate, Account: account, Region: region, FIPS: fips, DualStack: s.dualStack}, true
		}
	}
	return ECRRegistry{}, false
}

func isAccountID(s string) bool {
	if len(s) != 12 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// isRegion accepts an AWS region name: lowercase letters, digits and '-',
// starting with a letter, e.g. us-east-1, cn-north-1, us-iso-east-1.
func isRegion(s string) bool {
	if len(s) < 2 || len(s) > 32 || s[len(s)-1] == '-' || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// isAccessKeyID accepts an AWS access key id (AKIA…, ASIA…): 16 to 128
// upper-case letters and digits.
func isAccessKeyID(s string) bool {
	if len(s) < 16 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// isRoleARN accepts arn:PARTITION:iam::ACCOUNT:role/NAME.
func isRoleARN(s string) bool {
	rest, ok := strings.CutPrefix(s, "arn:")
	if !ok {
		return false
	}
	partition, rest, ok := strings.Cut(rest, ":")
	if !ok || !strings.HasPrefix(partition, "aws") {
		return false
	}
	rest, ok = strings.CutPrefix(rest, "iam::")
	if !ok {
		return false
	}
	account, name, ok := strings.Cut(rest, ":role/")
	return ok && isAccountID(account) && name != "" && !strings.ContainsAny(name, " \t\r\n")
}

// validateECR checks an ECR secret: the identity it names and, for every
// registry pattern, that the region and account are known.
func validateECR(s Secret, v Value) error {
	if v.Username != "" || v.Password != "" || v.IdentityToken != "" {
		return errors.New("an ecr secret has no username, password or token: it is exchanged for a registry token at pull time")
	}
	var a AWSValue
	if v.AWS != nil {
		a = *v.AWS
	}
	if (a.AccessKeyID == "") != (a.SecretAccessKey == "") {
		return errors.New("give both an AWS access key id and its secret access key, or neither")
	}
	if a.AccessKeyID != "" && !isAccessKeyID(a.AccessKeyID) {
		// Not quoted: a secret key pasted in the wrong place must not be echoed.
		return errors.New("the AWS access key id is not valid (16 to 128 upper-case letters and digits, e.g. AKIA…)")
	}
	if a.AccessKeyID != "" && a.Profile != "" {
		return errors.New("give AWS keys or an AWS profile, not both")
	}
	if a.RoleARN != "" && !isRoleARN(a.RoleARN) {
		return fmt.Errorf("AWS role ARN %q is not valid (want arn:aws:iam::ACCOUNT:role/NAME)", a.RoleARN)
	}
	if a.ExternalID != "" && a.RoleARN == "" {
		return errors.New("an AWS external id needs a role ARN to assume")
	}
	if a.Region != "" && !isRegion(a.Region) {
		return fmt.Errorf("AWS region %q is not valid", a.Region)
	}
	for _, p := range s.Registries {
		r, ok := ParseECRHost(p.Host())
		switch {
		case !ok && a.Region == "":
			return fmt.Errorf("registry %s is not an ECR host (ACCOUNT.dkr.ecr.REGION.amazonaws.com or public.ecr.aws); for a mirror or alias of one give its AWS region", p)
		case ok && a.Region != "" && a.Region != r.Region:
			return fmt.Errorf("registry %s is in region %s, but the secret names region %s", p, r.Region, a.Region)
		}
	}
	return nil
}

// ECRRegistryFor is the registry whose token a pull from t needs: the one
// t's host names, or for another host (a mirror in front of ECR) the
// region stored with the secret. (A token is good for every registry the
// identity may use, so no account is needed.)
func ECRRegistryFor(v Value, t Target) (ECRRegistry, error) {
	var a AWSValue
	if v.AWS != nil {
		a = *v.AWS
	}
	if r, ok := ParseECRHost(t.Host); ok {
		return r, nil
	}
	if a.Region == "" {
		return ECRRegistry{}, fmt.Errorf("%s is not an ECR registry host and the secret names no AWS region", t.Host)
	}
	return ECRRegistry{Service: ECRPrivate, Region: a.Region}, nil
}

// ECRRequest is one GetAuthorizationToken exchange.
type ECRRequest struct {
	Registry ECRRegistry `json:"registry"`
	AWS      AWSValue    `json:"aws"`
	// SessionName names the STS session when a role is assumed, so that
	// CloudTrail shows which secret asked.
	SessionName string `json:"session_name,omitempty"`
}

// String never prints the request: it carries the secret key.
func (ECRRequest) String() string { return "secret.ECRRequest{REDACTED}" }

// GoString keeps %#v from leaking the request.
func (r ECRRequest) GoString() string { return r.String() }

// ECRToken is a registry token from GetAuthorizationToken.
type ECRToken struct {
	Username      string    `json:"username"`
	Password      string    `json:"password"`
	Expires       time.Time `json:"expires"`
	ProxyEndpoint string    `json:"proxy_endpoint,omitempty"`
	// Issued is when the token was fetched; Expires-Issued is its life.
	Issued time.Time `json:"issued"`
}

// String never prints the token.
func (ECRToken) String() string { return "secret.ECRToken{REDACTED}" }

// GoString keeps %#v from leaking the token.
func (t ECRToken) GoString() string { return t.String() }

// ECRExchanger exchanges an AWS identity for an ECR registry token.
// Package secret/awsecr has the implementation that calls AWS;
// ExecExchanger runs it in another process.
type ECRExchanger interface {
	Exchange(ctx context.Context, r ECRRequest) (ECRToken, error)
}

// The kinds of ECR failure. Every error an ECRExchanger returns wraps one
// of them, so callers can tell them apart with errors.Is; none is the
// credential helper's "not found", which means only that no secret covers
// the registry.
var (
	ErrAWSNoCredentials      = errors.New("no AWS credentials")
	ErrAWSAccessDenied       = errors.New("access denied by AWS IAM")
	ErrAWSInvalidCredentials = errors.New("AWS rejected the credentials")
	ErrAWSRegion             = errors.New("wrong AWS region or ECR registry")
	ErrAWSThrottled          = errors.New("throttled by AWS")
	ErrAWSUnreachable        = errors.New("AWS API unreachable")
	ErrAWSFailed             = errors.New("ECR token exchange failed")
)

var awsErrorKinds = map[string]error{
	"no-credentials":      ErrAWSNoCredentials,
	"access-denied":       ErrAWSAccessDenied,
	"invalid-credentials": ErrAWSInvalidCredentials,
	"region":              ErrAWSRegion,
	"throttled":           ErrAWSThrottled,
	"unreachable":         ErrAWSUnreachable,
	"failed":              ErrAWSFailed,
}

// ECRError is a classified ECR failure. Detail says what to do about it
// and never holds a secret.
type ECRError struct {
	Kind   error // one of the ErrAWS… values
	Detail string
}

func (e *ECRError) Error() string {
	if e.Detail == "" {
		return e.Kind.Error()
	}
	return e.Kind.Error() + ": " + e.Detail
}

func (e *ECRError) Unwrap() error { return e.Kind }

func awsKindName(err error) string {
	for name, k := range awsErrorKinds {
		if errors.Is(err, k) {
			return name
		}
	}
	return "failed"
}

// ECRProvider turns ECR secrets into registry tokens at pull time, through a
// token cache.
type ECRProvider struct {
	exchanger ECRExchanger
	cache     TokenCache
}

// ECROption configures an ECRProvider.
type ECROption func(*ECRProvider)

// WithTokenCache sets the provider's token cache (default: a
// MemoryTokenCache with default settings).
func WithTokenCache(c TokenCache) ECROption { return func(p *ECRProvider) { p.cache = c } }

// NewECRProvider returns the provider of kind ECR. It is cheap: nothing
// touches AWS until a secret is resolved.
func NewECRProvider(ex ECRExchanger, opts ...ECROption) *ECRProvider {
	p := &ECRProvider{exchanger: ex}
	for _, o := range opts {
		o(p)
	}
	if p.cache == nil {
		p.cache = NewMemoryTokenCache()
	}
	return p
}

// Credential exchanges the secret's AWS identity for a token of the
// registry t names, from the cache when it holds a fresh one.
func (p *ECRProvider) Credential(ctx context.Context, s Secret, v Value, t Target) (Credential, error) {
	reg, err := ECRRegistryFor(v, t)
	if err != nil {
		return Credential{}, &ECRError{Kind: ErrAWSRegion, Detail: err.Error()}
	}
	req := ECRRequest{Registry: reg, SessionName: sessionName(s)}
	if v.AWS != nil {
		req.AWS = *v.AWS
	}
	key := tokenKey(s, req)
	tok, err := p.cache.Token(ctx, key, func(ctx context.Context) (ECRToken, error) {
		return p.exchanger.Exchange(ctx, req)
	})
	if err != nil {
		return Credential{}, err
	}
	user := tok.Username
	if user == "" {
		user = ECRUsername
	}
	return Credential{Username: user, Password: tok.Password, Expires: tok.Expires}, nil
}

// sessionName is the STS role session name: "pullsecret-PROJECT-NAME",
// at most 64 characters of [\w+=,.@-].
func sessionName(s Secret) string {
	n := "pullsecret-" + s.Project + "-" + s.Name
	if len(n) > 64 {
		n = n[:64]
	}
	return n
}

// tokenKey identifies whose token a request gets: the secret (project,
// name, version, so an update fetches anew) and the AWS identity and
// registry. The ID is a SHA-256 of all that, so no key id sits in a map or
// a file in the clear.
func tokenKey(s Secret, r ECRRequest) TokenKey {
	b, _ := json.Marshal([]any{"pullsecret/ecr-token/v1", s.Project, s.Name, s.Version,
		r.Registry.Service, r.Registry.Account, r.Registry.Region, r.Registry.FIPS, r.Registry.DualStack,
		r.AWS.AccessKeyID, r.AWS.RoleARN, r.AWS.ExternalID, r.AWS.Profile})
	sum := sha256.Sum256(b)
	return TokenKey{
		ID:    hex.EncodeToString(sum[:]),
		Label: s.Project + "/" + s.Name + " (" + r.Registry.String() + ")",
	}
}

// The exchange protocol between the credential helper and the program that
// links the AWS SDK: one JSON request on stdin, one JSON response on
// stdout. The request holds the sealed value's AWS fields, so it goes
// through a pipe, never an argument or the environment.

// ECRExchangeArg is the hidden argument that makes the pullsecret program
// serve one exchange (see ServeECRExchange).
const ECRExchangeArg = "__ecr-exchange"

type exchangeResponse struct {
	Token *ECRToken      `json:"token,omitempty"`
	Error *exchangeError `json:"error,omitempty"`
}

type exchangeError struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

// ServeECRExchange reads one ECRRequest from r, runs it through ex and
// writes the result to w. It returns an error only when the request cannot
// be read or the answer written; an AWS failure is part of the answer.
func ServeECRExchange(ctx context.Context, ex ECRExchanger, r io.Reader, w io.Writer) error {
	var req ECRRequest
	b, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return fmt.Errorf("read exchange request: %w", err)
	}
	defer clear(b)
	if err := json.Unmarshal(b, &req); err != nil {
		// Never wrap the JSON error: it could quote the request.
		return errors.New("exchange request is not valid JSON")
	}
	var resp exchangeResponse
	tok, err := ex.Exchange(ctx, req)
	if err != nil {
		var ee *ECRError
		if !errors.As(err, &ee) {
			ee = &ECRError{Kind: ErrAWSFailed, Detail: err.Error()}
		}
		resp.Error = &exchangeError{Kind: awsKindName(ee.Kind), Message: ee.Detail}
	} else {
		resp.Token = &tok
	}
	return json.NewEncoder(w).Encode(resp)
}

// ExecExchanger runs the exchange in another process: Path with Args (by
// default the pullsecret program with ECRExchangeArg), which calls AWS.
// The credential helper uses it so that it links no AWS code itself.
type ExecExchanger struct {
	Path string
	Args []string
	// Env is the child's environment; nil inherits this process's, which
	// is what the AWS default credential chain reads.
	Env []string
	// Stderr receives the child's own diagnostics; nil discards them.
	Stderr io.Writer
}

// Exchange runs one exchange in a child process.
func (e *ExecExchanger) Exchange(ctx context.Context, r ECRRequest) (ECRToken, error) {
	in, err := json.Marshal(r)
	if err != nil {
		return ECRToken{}, err
	}
	defer clear(in)
	args := e.Args
	if args == nil {
		args = []string{ECRExchangeArg}
	}
	cmd := exec.CommandContext(ctx, e.Path, args...)
	cmd.Stdin = bytes.NewReader(in)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = e.Stderr
	cmd.Env = e.Env
	cmd.WaitDelay = time.Second
	runErr := cmd.Run()
	defer clear(out.Bytes())
	tok, err := decodeExchange(out.Bytes())
	if errors.Is(err, errNoAnswer) {
		if ctx.Err() != nil {
			return ECRToken{}, &ECRError{Kind: ErrAWSUnreachable, Detail: "no answer from AWS in time: " + ctx.Err().Error()}
		}
		detail := "the AWS exchange program " + e.Path + " gave no answer"
		if runErr != nil {
			detail += " (" + runErr.Error() + ")"
		}
		return ECRToken{}, &ECRError{Kind: ErrAWSFailed, Detail: detail}
	}
	return tok, err
}

var errNoAnswer = errors.New("no exchange answer")

// decodeExchange reads ServeECRExchange's answer.
func decodeExchange(b []byte) (ECRToken, error) {
	var resp exchangeResponse
	if err := json.Unmarshal(b, &resp); err != nil || (resp.Token == nil && resp.Error == nil) {
		return ECRToken{}, errNoAnswer
	}
	if resp.Error != nil {
		kind, ok := awsErrorKinds[resp.Error.Kind]
		if !ok {
			kind = ErrAWSFailed
		}
		return ECRToken{}, &ECRError{Kind: kind, Detail: resp.Error.Message}
	}
	return *resp.Token, nil
}

// discardLogger is the default logger of the token caches.
var discardLogger = slog.New(slog.DiscardHandler)
