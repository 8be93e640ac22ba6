package registry

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// The AWS APIs FakeECR answers, as named in Fail and Calls.
const (
	APIGetAuthorizationToken       = "ecr:GetAuthorizationToken"
	APIPublicGetAuthorizationToken = "ecr-public:GetAuthorizationToken"
	APIAssumeRole                  = "sts:AssumeRole"
)

const (
	ecrTarget       = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
	ecrPublicTarget = "SpencerFrontendService.GetAuthorizationToken"
)

// FakeECR stands in for the AWS APIs behind ECR pull secrets: ECR and ECR
// Public GetAuthorizationToken (JSON 1.1) and STS AssumeRole (query
// protocol), all on one httptest server. Point an SDK client at URL (its
// BaseEndpoint, or AWS_ENDPOINT_URL_ECR / _ECR_PUBLIC / _STS).
//
// It checks SigV4 signatures against the secret keys of the users it was
// given, so a wrong secret key is refused as AWS refuses it; it issues a
// fresh random password per GetAuthorizationToken call, valid for the token
// TTL; and Wrap makes a registry accept user "AWS" with any password that
// is currently valid, so expiry and refresh are real. Calls are counted and
// failures can be injected.
type FakeECR struct {
	srv     *httptest.Server
	now     func() time.Time
	account string
	region  string // "" accepts any signing region

	mu        sync.Mutex
	ttl       time.Duration
	users     map[string]fakeIdentity // access key id -> identity (users and role sessions)
	roles     map[string]fakeRole
	passwords map[string]fakeIssued
	allow     map[string][]string // principal -> repository prefixes it may pull
	calls     map[string]int
	failures  map[string]*fakeFailure
	requests  []FakeECRRequest
}

type fakeIdentity struct {
	secret, session string
	principal       string // user ARN, or the role ARN of a role session
}

type fakeRole struct {
	externalID string
	trusted    []string // principals allowed to assume it; empty means any
}

type fakeIssued struct {
	principal string
	expires   time.Time
}

type fakeFailure struct {
	code    string
	message string
	times   int // < 0: until cleared
}

// FakeECRRequest is one request FakeECR received, as tests assert on it.
type FakeECRRequest struct {
	API         string // one of the API… constants, or "" for an unknown request
	AccessKeyID string // from the SigV4 credential scope; never the secret key
	Region      string // the signing region
	Principal   string // who it authenticated as, "" if it did not
	Status      int
}

// FakeECROption configures a FakeECR.
type FakeECROption func(*FakeECR)

// WithECRTokenTTL sets the life of the passwords GetAuthorizationToken issues
// (default 12 hours, as in AWS).
func WithECRTokenTTL(d time.Duration) FakeECROption { return func(f *FakeECR) { f.ttl = d } }

// WithECRClock sets the clock that stamps and checks token expiry.
func WithECRClock(now func() time.Time) FakeECROption { return func(f *FakeECR) { f.now = now } }

// WithECRRegion refuses requests signed for another region, as a regional
// AWS endpoint does.
func WithECRRegion(region string) FakeECROption { return func(f *FakeECR) { f.region = region } }

// WithECRAccount sets the account of the default registry (default
// 123456789012).
func WithECRAccount(account string) FakeECROption { return func(f *FakeECR) { f.account = account } }

// NewFakeECR starts a fake AWS endpoint on a free loopback port. Close it
// when done.
func NewFakeECR(opts ...FakeECROption) *FakeECR {
	f := &FakeECR{
		now:       time.Now,
		account:   "123456789012",
		ttl:       12 * time.Hour,
		users:     map[string]fakeIdentity{},
		roles:     map[string]fakeRole{},
		passwords: map[string]fakeIssued{},
		allow:     map[string][]string{},
		calls:     map[string]int{},
		failures:  map[string]*fakeFailure{},
	}
	for _, o := range opts {
		o(f)
	}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serveAPI))
	return f
}

// URL is the endpoint, http://127.0.0.1:PORT.
func (f *FakeECR) URL() string { return f.srv.URL }

// Close stops the endpoint.
func (f *FakeECR) Close() { f.srv.Close() }

// AddUser lets an IAM user sign requests with keyID and secretKey. principal
// is its ARN, e.g. arn:aws:iam::123456789012:user/ci.
func (f *FakeECR) AddUser(keyID, secretKey, principal string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.users[keyID] = fakeIdentity{secret: secretKey, principal: principal}
}

// AddRole makes roleARN assumable, by the given principals only if any are
// named, and only with externalID if it is not "".
func (f *FakeECR) AddRole(roleARN, externalID string, trusted ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.roles[roleARN] = fakeRole{externalID: externalID, trusted: trusted}
}

// SetTokenTTL changes the life of passwords issued from now on.
func (f *FakeECR) SetTokenTTL(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ttl = d
}

// AllowRepos limits what a principal's passwords may pull from a registry
// using Wrap to repositories under the given prefixes ("team-a" covers
// team-a and team-a/app). A principal never named may pull anything.
func (f *FakeECR) AllowRepos(principal string, prefixes ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.allow[principal] = append([]string(nil), prefixes...)
}

// Fail makes the next times calls of api (all of them if times < 0) fail
// with the AWS error code, e.g. AccessDeniedException or
// ThrottlingException for ECR, AccessDenied or Throttling for STS.
func (f *FakeECR) Fail(api, code string, times int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failures[api] = &fakeFailure{code: code, message: "injected " + code, times: times}
}

// ClearFailures removes every injected failure.
func (f *FakeECR) ClearFailures() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.failures)
}

// Calls is how many requests for api arrived, failed ones included.
func (f *FakeECR) Calls(api string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[api]
}

// Requests returns every request received so far.
func (f *FakeECR) Requests() []FakeECRRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]FakeECRRequest(nil), f.requests...)
}

// Issued returns every password issued so far, valid or not: the canaries a
// test greps its outputs for.
func (f *FakeECR) Issued() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, 0, len(f.passwords))
	for p := range f.passwords {
		out = append(out, p)
	}
	return out
}

// PrincipalOf says who password was issued to: the user ARN, or the role
// ARN for a role session.
func (f *FakeECR) PrincipalOf(password string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.passwords[password]
	return p.principal, ok
}

// Valid reports whether password was issued and has not expired.
func (f *FakeECR) Valid(password string) bool {
	_, ok := f.validPrincipal(password)
	return ok
}

func (f *FakeECR) validPrincipal(password string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.passwords[password]
	if !ok || !f.now().Before(p.expires) {
		return "", false
	}
	return p.principal, true
}

// StartECR starts a registry (see Start) whose clients authenticate as ECR's
// do: HTTP Basic with user AWS and a password f issued that has not expired.
func StartECR(ctx context.Context, f *FakeECR, opts ...Option) (*Registry, error) {
	return Start(ctx, append(opts, WithHandlerWrapper(f.Wrap))...)
}

var v2Name = regexp.MustCompile(`^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/`)

// Wrap puts ECR's registry authentication in front of next: /v2/ requests
// need user AWS and a currently valid password, and a principal limited by
// AllowRepos may reach only its repositories.
func (f *FakeECR) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/v2") {
			next.ServeHTTP(w, r)
			return
		}
		user, pass, ok := r.BasicAuth()
		principal, valid := "", false
		if ok && user == "AWS" {
			principal, valid = f.validPrincipal(pass)
		}
		if !valid {
			w.Header().Set("WWW-Authenticate", `Basic realm="https://`+r.Host+`/",service="ecr.amazonaws.com"`)
			writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
			return
		}
		if m := v2Name.FindStringSubmatch(r.URL.Path); m != nil {
			f.mu.Lock()
			prefixes, limited := f.allow[principal]
			f.mu.Unlock()
			if limited && !underAny(m[1], prefixes) {
				writeError(w, http.StatusForbidden, "DENIED", "not authorized to access repository "+m[1])
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func underAny(repo string, prefixes []string) bool {
	for _, p := range prefixes {
		if repo == p || strings.HasPrefix(repo, p+"/") {
			return true
		}
	}
	return false
}

// serveAPI answers the AWS API requests.
func (f *FakeECR) serveAPI(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil || r.Method != http.MethodPost {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	api, jsonProto := "", true
	switch r.Header.Get("X-Amz-Target") {
	case ecrTarget:
		api = APIGetAuthorizationToken
	case ecrPublicTarget:
		api = APIPublicGetAuthorizationToken
	case "":
		form, _ := url.ParseQuery(string(body))
		if form.Get("Action") == "AssumeRole" {
			api, jsonProto = APIAssumeRole, false
		}
	}
	rec := FakeECRRequest{API: api}
	reply := func(status int, v any) {
		rec.Status = status
		f.mu.Lock()
		f.requests = append(f.requests, rec)
		f.mu.Unlock()
		w.Header().Set("X-Amzn-RequestId", randomHex(16))
		if jsonProto {
			w.Header().Set("Content-Type", "application/x-amz-json-1.1")
			b, _ := json.Marshal(v)
			w.WriteHeader(status)
			_, _ = w.Write(b)
			return
		}
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, xml.Header)
		_ = xml.NewEncoder(w).Encode(v)
	}
	fail := func(status int, code, message string) {
		if jsonProto {
			w.Header().Set("X-Amzn-ErrorType", code)
			reply(status, map[string]string{"__type": code, "message": message})
			return
		}
		reply(status, stsErrorResponse{Error: stsError{Type: "Sender", Code: code, Message: message}, RequestID: randomHex(16)})
	}
	if api == "" {
		fail(http.StatusBadRequest, "UnknownOperationException", "unknown operation")
		return
	}
	f.mu.Lock()
	f.calls[api]++
	f.mu.Unlock()

	id, keyID, region, code, msg := f.authenticate(r, body)
	rec.AccessKeyID, rec.Region = keyID, region
	if code != "" {
		fail(http.StatusBadRequest, code, msg)
		return
	}
	rec.Principal = id.principal
	if code, msg, ok := f.injected(api); ok {
		status := http.StatusBadRequest
		if code == "AccessDenied" {
			status = http.StatusForbidden
		}
		fail(status, code, msg)
		return
	}
	switch api {
	case APIGetAuthorizationToken, APIPublicGetAuthorizationToken:
		f.serveToken(api, id, region, body, reply, fail)
	case APIAssumeRole:
		f.serveAssumeRole(id, body, reply, fail)
	}
}

func (f *FakeECR) injected(api string) (code, message string, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fl := f.failures[api]
	if fl == nil || fl.times == 0 {
		return "", "", false
	}
	if fl.times > 0 {
		fl.times--
	}
	return fl.code, fl.message, true
}

var sigField = regexp.MustCompile(`(Credential|SignedHeaders|Signature)=([^,\s]+)`)

// authenticate checks the SigV4 signature of r. On failure it returns the
// AWS error code and message.
func (f *FakeECR) authenticate(r *http.Request, body []byte) (id fakeIdentity, keyID, region, code, message string) {
	auth := r.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 ") {
		return id, "", "", "MissingAuthenticationTokenException", "Missing Authentication Token"
	}
	fields := map[string]string{}
	for _, m := range sigField.FindAllStringSubmatch(auth, -1) {
		fields[m[1]] = m[2]
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[4] != "aws4_request" || fields["Signature"] == "" || fields["SignedHeaders"] == "" {
		return id, "", "", "IncompleteSignatureException", "Authorization header is malformed"
	}
	keyID, region, service := scope[0], scope[2], scope[3]
	f.mu.Lock()
	id, known := f.users[keyID]
	f.mu.Unlock()
	if !known {
		return id, keyID, region, "UnrecognizedClientException", "The security token included in the request is invalid."
	}
	if id.session != "" && subtle.ConstantTimeCompare([]byte(r.Header.Get("X-Amz-Security-Token")), []byte(id.session)) != 1 {
		return id, keyID, region, "UnrecognizedClientException", "The security token included in the request is invalid."
	}
	signed, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return id, keyID, region, "IncompleteSignatureException", "X-Amz-Date is missing or malformed"
	}
	// Re-sign a copy carrying only the headers the client signed.
	cp, _ := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), bytes.NewReader(body))
	cp.Host = r.Host
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		if h != "host" && h != "content-length" {
			cp.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	cp.ContentLength = int64(len(body))
	sum := sha256.Sum256(body)
	creds := aws.Credentials{AccessKeyID: keyID, SecretAccessKey: id.secret, SessionToken: id.session}
	if err := v4.NewSigner().SignHTTP(r.Context(), creds, cp, hex.EncodeToString(sum[:]), service, region, signed); err != nil {
		return id, keyID, region, "InvalidSignatureException", "signature check failed"
	}
	want := ""
	for _, m := range sigField.FindAllStringSubmatch(cp.Header.Get("Authorization"), -1) {
		if m[1] == "Signature" {
			want = m[2]
		}
	}
	if subtle.ConstantTimeCompare([]byte(want), []byte(fields["Signature"])) != 1 {
		code := "InvalidSignatureException"
		if service == "sts" {
			code = "SignatureDoesNotMatch"
		}
		return id, keyID, region, code, "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."
	}
	if f.region != "" && region != f.region && service != "sts" {
		return id, keyID, region, "InvalidSignatureException", fmt.Sprintf("Credential should be scoped to a valid region, not '%s'. ", region)
	}
	return id, keyID, region, "", ""
}

func (f *FakeECR) serveToken(api string, id fakeIdentity, region string, body []byte, reply func(int, any), fail func(int, string, string)) {
	var in struct {
		RegistryIDs []string `json:"registryIds"`
	}
	if len(bytes.TrimSpace(body)) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			fail(http.StatusBadRequest, "SerializationException", "request body is not valid JSON")
			return
		}
	}
	account := f.account
	if len(in.RegistryIDs) > 0 {
		account = in.RegistryIDs[0]
	}
	if api == APIGetAuthorizationToken && (len(account) != 12 || strings.Trim(account, "0123456789") != "") {
		fail(http.StatusBadRequest, "InvalidParameterException", "Invalid parameter at 'registryIds' failed to satisfy constraint: 'must satisfy regular expression '[0-9]{12}''")
		return
	}
	b := make([]byte, 48)
	_, _ = rand.Read(b)
	password := "fake-ecr-" + base64.RawURLEncoding.EncodeToString(b)
	f.mu.Lock()
	expires := f.now().Add(f.ttl)
	f.passwords[password] = fakeIssued{principal: id.principal, expires: expires}
	f.mu.Unlock()
	data := map[string]any{
		"authorizationToken": base64.StdEncoding.EncodeToString([]byte("AWS:" + password)),
		"expiresAt":          float64(expires.UnixMilli()) / 1000,
	}
	if api == APIPublicGetAuthorizationToken {
		reply(http.StatusOK, map[string]any{"authorizationData": data})
		return
	}
	data["proxyEndpoint"] = "https://" + account + ".dkr.ecr." + region + ".amazonaws.com"
	reply(http.StatusOK, map[string]any{"authorizationData": []any{data}})
}

type stsErrorResponse struct {
	XMLName   xml.Name `xml:"ErrorResponse"`
	Error     stsError `xml:"Error"`
	RequestID string   `xml:"RequestId"`
}

type stsError struct {
	Type    string `xml:"Type"`
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
}

type stsAssumeRoleResponse struct {
	XMLName xml.Name `xml:"https://sts.amazonaws.com/doc/2011-06-15/ AssumeRoleResponse"`
	Result  struct {
		Credentials struct {
			AccessKeyID     string `xml:"AccessKeyId"`
			SecretAccessKey string `xml:"SecretAccessKey"`
			SessionToken    string `xml:"SessionToken"`
			Expiration      string `xml:"Expiration"`
		} `xml:"Credentials"`
		AssumedRoleUser struct {
			Arn           string `xml:"Arn"`
			AssumedRoleID string `xml:"AssumedRoleId"`
		} `xml:"AssumedRoleUser"`
	} `xml:"AssumeRoleResult"`
	RequestID string `xml:"ResponseMetadata>RequestId"`
}

func (f *FakeECR) serveAssumeRole(id fakeIdentity, body []byte, reply func(int, any), fail func(int, string, string)) {
	form, _ := url.ParseQuery(string(body))
	arn, session := form.Get("RoleArn"), form.Get("RoleSessionName")
	f.mu.Lock()
	role, ok := f.roles[arn]
	f.mu.Unlock()
	denied := func() {
		fail(http.StatusForbidden, "AccessDenied", "User: "+id.principal+" is not authorized to perform: sts:AssumeRole on resource: "+arn)
	}
	switch {
	case !ok:
		denied()
		return
	case len(role.trusted) > 0 && !slices.Contains(role.trusted, id.principal):
		denied()
		return
	case role.externalID != "" && subtle.ConstantTimeCompare([]byte(role.externalID), []byte(form.Get("ExternalId"))) != 1:
		denied()
		return
	case session == "":
		fail(http.StatusBadRequest, "ValidationError", "RoleSessionName is required")
		return
	}
	keyID := "ASIAFAKE" + strings.ToUpper(randomHex(6))
	secretKey, token := randomHex(20), randomHex(32)
	f.mu.Lock()
	f.users[keyID] = fakeIdentity{secret: secretKey, session: token, principal: arn}
	expires := f.now().Add(time.Hour)
	f.mu.Unlock()
	var out stsAssumeRoleResponse
	out.Result.Credentials.AccessKeyID = keyID
	out.Result.Credentials.SecretAccessKey = secretKey
	out.Result.Credentials.SessionToken = token
	out.Result.Credentials.Expiration = expires.UTC().Format(time.RFC3339)
	out.Result.AssumedRoleUser.Arn = strings.Replace(strings.Replace(arn, ":iam:", ":sts:", 1), ":role/", ":assumed-role/", 1) + "/" + session
	out.Result.AssumedRoleUser.AssumedRoleID = "AROAFAKE" + strings.ToUpper(randomHex(6)) + ":" + session
	out.RequestID = randomHex(16)
	reply(http.StatusOK, out)
}
