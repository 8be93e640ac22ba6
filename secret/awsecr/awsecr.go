// Package awsecr exchanges AWS identities for Amazon ECR registry tokens
// with aws-sdk-go-v2: ECR's or ECR Public's GetAuthorizationToken, after
// assuming a role through STS when the secret names one.
//
// It is apart from package secret because linking the AWS SDK costs every
// process that imports it milliseconds at start-up; the server links it,
// the credential helper runs it in a child process only when it has no
// fresh token (see secret.ExecExchanger).
package awsecr

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/credentials/endpointcreds"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/ecr"
	"github.com/aws/aws-sdk-go-v2/service/ecrpublic"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"

	"github.com/pullsecret/pullsecret/secret"
)

// Defaults.
const (
	// DefaultMetadataTimeout bounds the instance and container metadata
	// endpoints: on a machine without them the default chain gives up
	// after about this long instead of the SDK's retries and fallbacks.
	DefaultMetadataTimeout = time.Second
	// DefaultHTTPTimeout bounds each AWS API request.
	DefaultHTTPTimeout = 10 * time.Second
	// DefaultMaxAttempts is the retry budget of an AWS call (throttling
	// included): small, since a pull is waiting.
	DefaultMaxAttempts = 3
	// credentialsTimeout bounds finding credentials in the default chain
	// (SSO, web identity and process providers may call out).
	credentialsTimeout = 15 * time.Second
)

// Exchanger calls AWS. The zero value is not usable; use New.
type Exchanger struct {
	ecrEndpoint, ecrPublicEndpoint, stsEndpoint string
	metadataTimeout, httpTimeout                time.Duration
	maxAttempts                                 int
}

var _ secret.ECRExchanger = (*Exchanger)(nil)

// Option configures an Exchanger.
type Option func(*Exchanger)

// WithECREndpoint sends ECR API calls to url instead of the region's
// endpoint (AWS_ENDPOINT_URL_ECR does the same from the environment).
func WithECREndpoint(url string) Option { return func(e *Exchanger) { e.ecrEndpoint = url } }

// WithECRPublicEndpoint sends ECR Public API calls to url
// (AWS_ENDPOINT_URL_ECR_PUBLIC).
func WithECRPublicEndpoint(url string) Option {
	return func(e *Exchanger) { e.ecrPublicEndpoint = url }
}

// WithSTSEndpoint sends STS calls to url (AWS_ENDPOINT_URL_STS).
func WithSTSEndpoint(url string) Option { return func(e *Exchanger) { e.stsEndpoint = url } }

// WithMetadataTimeout bounds the instance and container metadata endpoints
// (default DefaultMetadataTimeout).
func WithMetadataTimeout(d time.Duration) Option {
	return func(e *Exchanger) {
		if d > 0 {
			e.metadataTimeout = d
		}
	}
}

// WithHTTPTimeout bounds each AWS API request (default DefaultHTTPTimeout).
func WithHTTPTimeout(d time.Duration) Option {
	return func(e *Exchanger) {
		if d > 0 {
			e.httpTimeout = d
		}
	}
}

// WithMaxAttempts sets the attempts per AWS call (default
// DefaultMaxAttempts).
func WithMaxAttempts(n int) Option {
	return func(e *Exchanger) {
		if n > 0 {
			e.maxAttempts = n
		}
	}
}

// New returns an Exchanger. It touches nothing until Exchange.
func New(opts ...Option) *Exchanger {
	e := &Exchanger{metadataTimeout: DefaultMetadataTimeout, httpTimeout: DefaultHTTPTimeout, maxAttempts: DefaultMaxAttempts}
	for _, o := range opts {
		o(e)
	}
	return e
}

// NewFromEnv is New with the metadata timeout from
// PULLSECRET_AWS_METADATA_TIMEOUT (a Go duration) when set. Endpoints come
// from the AWS SDK's own variables (AWS_ENDPOINT_URL_ECR, …).
func NewFromEnv(getenv func(string) string, opts ...Option) *Exchanger {
	if d, err := time.ParseDuration(getenv("PULLSECRET_AWS_METADATA_TIMEOUT")); err == nil && d > 0 {
		opts = append([]Option{WithMetadataTimeout(d)}, opts...)
	}
	return New(opts...)
}

// Exchange gets a registry token for r.Registry with r.AWS's identity.
func (e *Exchanger) Exchange(ctx context.Context, r secret.ECRRequest) (secret.ECRToken, error) {
	cfg, err := e.config(ctx, r)
	if err != nil {
		return secret.ECRToken{}, err
	}
	issued := time.Now()
	var raw string
	var expires *time.Time
	var proxy string
	op := "ECR GetAuthorizationToken"
	switch r.Registry.Service {
	case secret.ECRPublic:
		op = "ECR Public GetAuthorizationToken"
		c := ecrpublic.NewFromConfig(cfg, func(o *ecrpublic.Options) {
			if e.ecrPublicEndpoint != "" {
				o.BaseEndpoint = aws.String(e.ecrPublicEndpoint)
			}
			if o.BaseEndpoint == nil && r.Registry.DualStack {
				o.EndpointOptions.UseDualStackEndpoint = aws.DualStackEndpointStateEnabled
			}
		})
		out, err := c.GetAuthorizationToken(ctx, &ecrpublic.GetAuthorizationTokenInput{})
		if err != nil {
			return secret.ECRToken{}, classify(err, r, op)
		}
		if out.AuthorizationData != nil {
			raw, expires = aws.ToString(out.AuthorizationData.AuthorizationToken), out.AuthorizationData.ExpiresAt
		}
	default:
		c := ecr.NewFromConfig(cfg, func(o *ecr.Options) {
			if e.ecrEndpoint != "" {
				o.BaseEndpoint = aws.String(e.ecrEndpoint)
			}
			// A custom endpoint cannot be combined with these.
			if o.BaseEndpoint == nil {
				if r.Registry.FIPS {
					o.EndpointOptions.UseFIPSEndpoint = aws.FIPSEndpointStateEnabled
				}
				if r.Registry.DualStack {
					o.EndpointOptions.UseDualStackEndpoint = aws.DualStackEndpointStateEnabled
				}
			}
		})
		// No RegistryIds: the token works for every registry the
		// principal may use, which is what AWS now documents.
		out, err := c.GetAuthorizationToken(ctx, &ecr.GetAuthorizationTokenInput{})
		if err != nil {
			return secret.ECRToken{}, classify(err, r, op)
		}
		if len(out.AuthorizationData) > 0 {
			d := out.AuthorizationData[0]
			raw, expires, proxy = aws.ToString(d.AuthorizationToken), d.ExpiresAt, aws.ToString(d.ProxyEndpoint)
		}
	}
	return decodeToken(raw, expires, proxy, issued, op)
}

func decodeToken(raw string, expires *time.Time, proxy string, issued time.Time, op string) (secret.ECRToken, error) {
	bad := func(what string) (secret.ECRToken, error) {
		return secret.ECRToken{}, &secret.ECRError{Kind: secret.ErrAWSFailed, Detail: op + " returned " + what}
	}
	if raw == "" {
		return bad("no authorization data")
	}
	if expires == nil || expires.IsZero() {
		return bad("a token without an expiry")
	}
	b, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return bad("a token that is not base64")
	}
	defer clear(b)
	user, pass, ok := strings.Cut(string(b), ":")
	if !ok || user == "" || pass == "" {
		return bad("a token that is not user:password")
	}
	return secret.ECRToken{Username: user, Password: pass, Expires: expires.UTC(), ProxyEndpoint: proxy, Issued: issued.UTC()}, nil
}

// config builds the SDK configuration for r: its region, its credentials
// (static keys, a profile or the default chain, then the role), with the
// metadata endpoints bounded. It retrieves the credentials, so a missing or
// refused identity is reported before any ECR call.
func (e *Exchanger) config(ctx context.Context, r secret.ECRRequest) (aws.Config, error) {
	a := r.AWS
	metaHTTP := awshttp.NewBuildableClient().WithTimeout(e.metadataTimeout / 2)
	opts := []func(*config.LoadOptions) error{
		config.WithRegion(r.Registry.Region),
		config.WithHTTPClient(awshttp.NewBuildableClient().WithTimeout(e.httpTimeout)),
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = e.maxAttempts
				o.MaxBackoff = time.Second
			})
		}),
		// The SDK's own metadata clients retry, fall back from IMDSv2 to
		// v1 and wait seconds each time; a machine with no metadata
		// endpoint must fail in about a second.
		config.WithEC2RoleCredentialOptions(func(o *ec2rolecreds.Options) {
			o.Client = imds.New(imds.Options{HTTPClient: metaHTTP, Retryer: aws.NopRetryer{}})
		}),
		config.WithEndpointCredentialOptions(func(o *endpointcreds.Options) {
			o.HTTPClient = &http.Client{Timeout: e.metadataTimeout}
			o.Retryer = aws.NopRetryer{}
		}),
	}
	switch {
	case a.AccessKeyID != "":
		opts = append(opts, config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(a.AccessKeyID, a.SecretAccessKey, "")))
	case a.Profile != "":
		opts = append(opts, config.WithSharedConfigProfile(a.Profile))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		var pe config.SharedConfigProfileNotExistError
		if errors.As(err, &pe) {
			return aws.Config{}, &secret.ECRError{Kind: secret.ErrAWSNoCredentials,
				Detail: fmt.Sprintf("AWS profile %q is not in the shared config files (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE or ~/.aws)", pe.Profile)}
		}
		return aws.Config{}, &secret.ECRError{Kind: secret.ErrAWSNoCredentials, Detail: "loading the AWS configuration: " + redact(err.Error(), a)}
	}
	if cfg.Credentials == nil {
		return aws.Config{}, noCredentials(e, a, nil)
	}
	cctx, cancel := context.WithTimeout(ctx, credentialsTimeout)
	defer cancel()
	if _, err := cfg.Credentials.Retrieve(cctx); err != nil {
		if a.AccessKeyID == "" && ctx.Err() == nil {
			return aws.Config{}, noCredentials(e, a, err)
		}
		return aws.Config{}, classify(err, r, "AWS credentials")
	}
	if a.RoleARN != "" {
		stsClient := sts.NewFromConfig(cfg, func(o *sts.Options) {
			if e.stsEndpoint != "" {
				o.BaseEndpoint = aws.String(e.stsEndpoint)
			}
		})
		cfg.Credentials = aws.NewCredentialsCache(stscreds.NewAssumeRoleProvider(stsClient, a.RoleARN, func(o *stscreds.AssumeRoleOptions) {
			o.RoleSessionName = r.SessionName
			if o.RoleSessionName == "" {
				o.RoleSessionName = "pullsecret"
			}
			if a.ExternalID != "" {
				o.ExternalID = aws.String(a.ExternalID)
			}
		}))
		if _, err := cfg.Credentials.Retrieve(cctx); err != nil {
			return aws.Config{}, classify(err, r, "STS AssumeRole "+a.RoleARN)
		}
	}
	return cfg, nil
}

func noCredentials(e *Exchanger, a secret.AWSValue, cause error) error {
	var where string
	if a.Profile != "" {
		where = fmt.Sprintf("AWS profile %q gave none", a.Profile)
	} else {
		where = fmt.Sprintf("the secret has no AWS keys or profile, the environment and the shared config files (~/.aws) name none, and no instance or container metadata endpoint answered within %s", e.metadataTimeout)
	}
	detail := where + "; give the secret keys (--aws-access-key-id with --aws-secret-access-key-stdin) or a profile (--aws-profile)"
	if cause != nil {
		detail += " (" + truncate(redact(cause.Error(), a), 300) + ")"
	}
	return &secret.ECRError{Kind: secret.ErrAWSNoCredentials, Detail: detail}
}

var (
	throttleCodes = codes("Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
		"RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "SlowDown",
		"ProvisionedThroughputExceededException", "TransactionInProgressException", "PriorRequestNotComplete",
		"BandwidthLimitExceeded", "LimitExceededException", "EC2ThrottledException")
	deniedCodes = codes("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedException",
		"AuthorizationError", "Forbidden")
	invalidCredentialCodes = codes("UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
		"InvalidSignatureException", "ExpiredToken", "ExpiredTokenException", "IncompleteSignature",
		"IncompleteSignatureException", "MissingAuthenticationToken", "MissingAuthenticationTokenException",
		"InvalidAccessKeyId", "InvalidToken", "RequestExpired")
	regionCodes = codes("InvalidParameterException", "RegistryNotFoundException", "RegionDisabledException",
		"AuthorizationHeaderMalformed", "InvalidRegion", "UnknownEndpoint")
)

func codes(c ...string) map[string]bool {
	m := map[string]bool{}
	for _, s := range c {
		m[s] = true
	}
	return m
}

// classify turns an SDK error into one of secret's ErrAWS… kinds with a
// message that says what to do and holds no secret.
func classify(err error, r secret.ECRRequest, op string) error {
	a := r.AWS
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code, msg := ae.ErrorCode(), truncate(redact(ae.ErrorMessage(), a), 400)
		switch {
		case throttleCodes[code]:
			return &secret.ECRError{Kind: secret.ErrAWSThrottled, Detail: fmt.Sprintf("%s: %s after %d attempts; try again shortly", op, code, DefaultMaxAttempts)}
		case regionCodes[code], code == "InvalidSignatureException" && strings.Contains(strings.ToLower(msg), "region"):
			return &secret.ECRError{Kind: secret.ErrAWSRegion, Detail: fmt.Sprintf("%s in region %s: %s: %s", op, r.Registry.Region, code, msg)}
		case deniedCodes[code]:
			return &secret.ECRError{Kind: secret.ErrAWSAccessDenied, Detail: fmt.Sprintf("%s: %s: %s", op, code, msg)}
		case invalidCredentialCodes[code]:
			return &secret.ECRError{Kind: secret.ErrAWSInvalidCredentials, Detail: fmt.Sprintf("%s: %s (unknown access key id, wrong secret key, or expired session): %s", op, code, msg)}
		}
		return &secret.ECRError{Kind: secret.ErrAWSFailed, Detail: fmt.Sprintf("%s: %s: %s", op, code, msg)}
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return &secret.ECRError{Kind: secret.ErrAWSRegion, Detail: fmt.Sprintf("%s: cannot resolve %s: check the region (%s) and the network", op, dnsErr.Name, r.Registry.Region)}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || os.IsTimeout(err) {
		return &secret.ECRError{Kind: secret.ErrAWSUnreachable, Detail: op + ": no answer in time"}
	}
	var netErr net.Error
	var opErr *net.OpError
	if errors.As(err, &netErr) || errors.As(err, &opErr) {
		return &secret.ECRError{Kind: secret.ErrAWSUnreachable, Detail: op + ": " + truncate(redact(err.Error(), a), 300)}
	}
	return &secret.ECRError{Kind: secret.ErrAWSFailed, Detail: op + ": " + truncate(redact(err.Error(), a), 300)}
}

// redact removes the secret key from s: AWS messages do not quote it, but
// a message is pasted into the caller's output, so make sure.
func redact(s string, a secret.AWSValue) string {
	if a.SecretAccessKey != "" {
		s = strings.ReplaceAll(s, a.SecretAccessKey, "REDACTED")
	}
	return s
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
