package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/pullsecret/pullsecret/internal/netguard"
)

// Registry error codes (OCI distribution-spec, plus distribution's
// UNAVAILABLE).
const (
	CodeBlobUnknown       = "BLOB_UNKNOWN"
	CodeBlobUploadInvalid = "BLOB_UPLOAD_INVALID"
	CodeBlobUploadUnknown = "BLOB_UPLOAD_UNKNOWN"
	CodeDigestInvalid     = "DIGEST_INVALID"
	CodeManifestInvalid   = "MANIFEST_INVALID"
	CodeManifestUnknown   = "MANIFEST_UNKNOWN"
	CodeNameInvalid       = "NAME_INVALID"
	CodeNameUnknown       = "NAME_UNKNOWN"
	CodeSizeInvalid       = "SIZE_INVALID"
	CodeUnauthorized      = "UNAUTHORIZED"
	CodeDenied            = "DENIED"
	CodeUnsupported       = "UNSUPPORTED"
	CodeTooManyRequests   = "TOOMANYREQUESTS"
	CodeUnavailable       = "UNAVAILABLE"
	CodeUnknown           = "UNKNOWN"
	CodeRangeInvalid      = "RANGE_INVALID"
)

// Error is a registry API error: what the client sees (status, code,
// message, detail and extra headers such as Retry-After) and, apart, the
// cause, which only goes to the log after redaction. Message and Detail
// are written by this package and never carry upstream text or a
// credential.
type Error struct {
	Status  int
	Code    string
	Message string
	Detail  any
	Header  http.Header
	// Cause is logged (redacted), never sent.
	Cause error
}

func (e *Error) Error() string {
	if e.Cause != nil {
		return e.Code + ": " + e.Message + ": " + e.Cause.Error()
	}
	return e.Code + ": " + e.Message
}

func (e *Error) Unwrap() error { return e.Cause }

// newError makes an Error.
func newError(status int, code, format string, a ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, a...)}
}

func (e *Error) withCause(err error) *Error { e.Cause = err; return e }

// errorBody is the registry JSON error document.
type errorBody struct {
	Errors []errorEntry `json:"errors"`
}

type errorEntry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// WriteError writes err as a registry JSON error. An error that is not an
// *Error is an internal failure: the client sees a generic 500 and the
// log has the (redacted) cause.
func WriteError(w http.ResponseWriter, r *http.Request, err error) {
	e := asError(err)
	if info := infoFrom(r.Context()); info != nil {
		info.err = e
	}
	for k, vs := range e.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Del("Content-Length")
	h.Del("Docker-Content-Digest")
	h.Del("Content-Range")
	w.WriteHeader(e.Status)
	if r.Method == http.MethodHead {
		return
	}
	b, _ := json.Marshal(errorBody{Errors: []errorEntry{{Code: e.Code, Message: e.Message, Detail: e.Detail}}})
	w.Write(append(b, '\n'))
}

func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if errors.Is(err, context.Canceled) {
		// The client went away; the status is for the log only.
		return &Error{Status: 499, Code: CodeUnknown, Message: "request canceled", Cause: err}
	}
	return &Error{Status: http.StatusInternalServerError, Code: CodeUnknown, Message: "internal error", Cause: err}
}

// upstreamOp says what was asked of the upstream, to pick a 404 code.
type upstreamOp int

const (
	opManifest upstreamOp = iota
	opBlob
	opTags
	opReferrers
	opPush
	opUpload
)

// mapUpstreamStatus turns an upstream's error response into what the
// client sees. Upstream bodies are never copied: only a known error code
// is kept.
func mapUpstreamStatus(t Target, op upstreamOp, resp *http.Response, withCredential bool) *Error {
	code := upstreamCode(resp)
	cause := fmt.Errorf("upstream %s answered %d %s", t.Upstream, resp.StatusCode, code)
	switch resp.StatusCode {
	case http.StatusUnauthorized, http.StatusForbidden:
		return deniedUpstream(t, withCredential).withCause(cause)
	case http.StatusNotFound:
		switch {
		case code == CodeNameUnknown:
			return newError(http.StatusNotFound, CodeNameUnknown, "repository %s not found on %s", t.Repo, t.Upstream).withCause(cause)
		case op == opBlob:
			return newError(http.StatusNotFound, CodeBlobUnknown, "blob unknown to %s", t.Upstream).withCause(cause)
		case op == opTags:
			return newError(http.StatusNotFound, CodeNameUnknown, "repository %s not found on %s", t.Repo, t.Upstream).withCause(cause)
		case op == opUpload:
			return newError(http.StatusNotFound, CodeBlobUploadUnknown, "upload unknown to %s", t.Upstream).withCause(cause)
		default:
			return newError(http.StatusNotFound, CodeManifestUnknown, "manifest unknown to %s", t.Upstream).withCause(cause)
		}
	case http.StatusTooManyRequests:
		e := newError(http.StatusTooManyRequests, CodeTooManyRequests, "upstream %s is rate limiting this proxy; retry later", t.Upstream).withCause(cause)
		if ra := resp.Header.Get("Retry-After"); validRetryAfter(ra) {
			e.Header = http.Header{"Retry-After": {ra}}
		}
		return e
	case http.StatusRequestedRangeNotSatisfiable:
		e := newError(http.StatusRequestedRangeNotSatisfiable, CodeRangeInvalid, "requested range not satisfiable").withCause(cause)
		if cr := resp.Header.Get("Content-Range"); cr != "" && len(cr) < 64 {
			e.Header = http.Header{"Content-Range": {cr}}
		}
		return e
	case http.StatusMethodNotAllowed, http.StatusNotImplemented:
		return newError(http.StatusMethodNotAllowed, CodeUnsupported, "upstream %s does not support this operation", t.Upstream).withCause(cause)
	case http.StatusRequestEntityTooLarge:
		return newError(http.StatusRequestEntityTooLarge, CodeSizeInvalid, "upstream %s refused the size of the content", t.Upstream).withCause(cause)
	case http.StatusServiceUnavailable:
		e := newError(http.StatusServiceUnavailable, CodeUnavailable, "upstream %s is unavailable (503)", t.Upstream).withCause(cause)
		if ra := resp.Header.Get("Retry-After"); validRetryAfter(ra) {
			e.Header = http.Header{"Retry-After": {ra}}
		}
		return e
	}
	if resp.StatusCode >= 500 {
		return newError(http.StatusBadGateway, CodeUnavailable, "upstream %s failed (%d)", t.Upstream, resp.StatusCode).withCause(cause)
	}
	if resp.StatusCode >= 400 {
		// 400 on a push (DIGEST_INVALID, MANIFEST_INVALID, ...): the code is
		// the upstream's, the message ours.
		if known(code) {
			return newError(resp.StatusCode, code, "upstream %s refused the request (%s)", t.Upstream, code).withCause(cause)
		}
		return newError(resp.StatusCode, CodeUnknown, "upstream %s refused the request (%d)", t.Upstream, resp.StatusCode).withCause(cause)
	}
	return newError(http.StatusBadGateway, CodeUnknown, "unexpected answer %d from upstream %s", resp.StatusCode, t.Upstream).withCause(cause)
}

// deniedUpstream is the answer when the upstream refuses the project's
// credential, or wants one the project does not have. Never a 404.
func deniedUpstream(t Target, withCredential bool) *Error {
	if withCredential {
		return newError(http.StatusForbidden, CodeDenied, "upstream rejected the project's pull secret for %s", t.Upstream)
	}
	return newError(http.StatusForbidden, CodeDenied, "upstream %s requires credentials and project %s has no pull secret covering %s/%s", t.Upstream, t.Project, t.Upstream, t.Repo)
}

func validRetryAfter(s string) bool {
	if s == "" || len(s) > 40 {
		return false
	}
	if _, err := strconv.Atoi(s); err == nil {
		return true
	}
	_, err := http.ParseTime(s)
	return err == nil
}

var knownCodes = map[string]bool{
	CodeBlobUnknown: true, CodeBlobUploadInvalid: true, CodeBlobUploadUnknown: true,
	CodeDigestInvalid: true, CodeManifestInvalid: true, CodeManifestUnknown: true,
	"MANIFEST_BLOB_UNKNOWN": true, "MANIFEST_UNVERIFIED": true, CodeNameInvalid: true,
	CodeNameUnknown: true, CodeSizeInvalid: true, "TAG_INVALID": true, CodeUnauthorized: true,
	CodeDenied: true, CodeUnsupported: true, CodeTooManyRequests: true, CodeUnavailable: true,
}

func known(code string) bool { return knownCodes[code] }

// upstreamCode reads the first error code of a registry JSON error body
// (bounded); the rest of the body is discarded.
func upstreamCode(resp *http.Response) string {
	if resp.Body == nil || resp.Request != nil && resp.Request.Method == http.MethodHead {
		return ""
	}
	var body struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	dec := json.NewDecoder(io.LimitReader(resp.Body, 64<<10))
	if dec.Decode(&body) != nil || len(body.Errors) == 0 {
		return ""
	}
	if c := body.Errors[0].Code; known(c) {
		return c
	}
	return ""
}

// mapTransportError maps an error from talking to the upstream (dial,
// TLS, ping, token exchange) to a client error.
func mapTransportError(t Target, err error, withCredential bool) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if errors.Is(err, context.Canceled) {
		return asError(err)
	}
	if b, ok := netguard.IsBlocked(err); ok {
		return newError(http.StatusForbidden, CodeDenied, "upstream %s is on a %s address (%s), which this proxy does not reach; the operator can allow it with allow_private_upstreams", t.Upstream, b.Reason, b.Addr).withCause(err)
	}
	var rr *realmRefusedError
	if errors.As(err, &rr) {
		return newError(http.StatusBadGateway, CodeDenied, "upstream %s named a token server on %s, outside its own domain; the project's credentials are not sent there", t.Upstream, rr.host).withCause(err)
	}
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return deniedUpstream(t, withCredential).withCause(errors.New(redactTransportError(te)))
		case http.StatusTooManyRequests:
			return newError(http.StatusTooManyRequests, CodeTooManyRequests, "upstream %s is rate limiting this proxy; retry later", t.Upstream).withCause(errors.New(redactTransportError(te)))
		}
		return newError(http.StatusBadGateway, CodeUnavailable, "upstream %s failed the authentication handshake (%d)", t.Upstream, te.StatusCode).withCause(errors.New(redactTransportError(te)))
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return newError(http.StatusGatewayTimeout, CodeUnavailable, "upstream %s timed out", t.Upstream).withCause(err)
	}
	var ne net.Error
	var oe *net.OpError
	var de *net.DNSError
	if errors.As(err, &de) {
		return newError(http.StatusBadGateway, CodeUnavailable, "upstream %s: host name not found", t.Upstream).withCause(err)
	}
	if errors.As(err, &oe) || errors.As(err, &ne) {
		return newError(http.StatusBadGateway, CodeUnavailable, "upstream %s is unreachable", t.Upstream).withCause(err)
	}
	return newError(http.StatusBadGateway, CodeUnavailable, "upstream %s: request failed", t.Upstream).withCause(err)
}

// redactTransportError describes a ggcr transport error without its body,
// which may echo what was sent.
func redactTransportError(te *transport.Error) string {
	s := fmt.Sprintf("status %d", te.StatusCode)
	for _, d := range te.Errors {
		if known(string(d.Code)) {
			s += " " + string(d.Code)
		}
	}
	return s
}
