package proxy

// The audit trail (package audit) as the server feeds it. What is recorded:
//
//   - proxy: one event per manifest GET (by tag or digest: one per image
//     pulled, plus one per platform manifest) and per blob GET, with the
//     digest served; per push that lands (manifest PUT, blob upload
//     PUT, cross-repository mount); and per refused request on any registry
//     route, whatever refused it: authentication, token scope, the
//     project's allowlist (a token of another project), the upstream.
//     HEADs that succeed, the PATCHes of an upload and Range GETs that
//     continue a blob at an offset are not recorded: they add no access the
//     recorded requests do not show. Neither is the 401 challenge every
//     client meets before it logs in.
//   - token server: refused logins (credentials presented and rejected, or
//     the failed-login limit hit), with the repository asked for.
//   - credential API (helper remote mode) and kubelet API: every request,
//     with the pull secret's name when a credential was handed out.
//
// Events never hold a credential: the token id comes from the token store,
// reasons are this package's own messages.

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/secret"
)

// auditRecordTimeout bounds how long a request waits for room in the audit
// queue when storage lags behind.
const auditRecordTimeout = 5 * time.Second

// WithAudit records proxied pulls and pushes and refused logins to l.
// Mount the credential and kubelet APIs with WithCredentialAudit and
// KubeletAuditTo for theirs.
func WithAudit(l audit.Log) Option {
	return func(o *options) { o.audit = l }
}

// WithCredentialAudit records every request to the credential API to l.
func WithCredentialAudit(l audit.Log) CredentialAPIOption {
	return func(c *credentialAPI) { c.audit = l }
}

// recordAudit records e, bounded in time, and logs a failure: the request
// has been answered already and is not failed for it.
func recordAudit(ctx context.Context, l audit.Log, log *slog.Logger, e audit.Event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), auditRecordTimeout)
	defer cancel()
	if err := l.Record(ctx, e); err != nil {
		log.Error("audit event lost", "action", e.Action, "project", e.Project, "decision", string(e.Decision), "err", err)
	}
}

// auditClient is the client address an event names: the connection's
// peer or, when the operator trusts a reverse proxy's headers
// (WithTrustForwardedHeaders), the last X-Forwarded-For address, which is
// the one that proxy added.
func auditClient(r *http.Request, trustForwarded bool) string {
	if trustForwarded {
		if xff := r.Header.Get("X-Forwarded-For"); xff != "" {
			parts := strings.Split(xff, ",")
			if a := strings.TrimSpace(parts[len(parts)-1]); a != "" && len(a) <= 64 && validHostHeader(a) {
				return a
			}
		}
	}
	return r.RemoteAddr
}

func (s *Server) trustsForwarded() bool {
	a, ok := s.auth.(*Auth)
	return ok && a.trustForwarded
}

// auditRequest records the request that observe just finished, if it is
// one the trail keeps.
func (s *Server) auditRequest(r *http.Request, info *reqInfo, status int, start time.Time) {
	var (
		e  audit.Event
		ok bool
	)
	switch info.route {
	case "token":
		e, ok = tokenAuditEvent(r, status)
	case "manifest", "blob", "upload", "tags", "referrers", "v2-other":
		e, ok = registryAuditEvent(r, info, status)
	}
	if !ok {
		return
	}
	e.Time, e.Client, e.Via, e.Status = start.UTC(), auditClient(r, s.trustsForwarded()), audit.ViaProxy, status
	recordAudit(r.Context(), s.audit, s.log, e)
}

// registryAuditEvent is the event of a /v2/<name>/... request.
func registryAuditEvent(r *http.Request, info *reqInfo, status int) (audit.Event, bool) {
	rt := info.rt
	if rt == nil {
		return audit.Event{}, false // the path names no repository
	}
	denied := info.err != nil && (info.err.Code == CodeDenied || info.err.Code == CodeUnauthorized)
	if status == http.StatusUnauthorized && !denied {
		return audit.Event{}, false // the challenge that starts a login
	}
	action := actionOf(r.Method)
	if rt.kind == routeUpload || rt.kind == routeUploadStart {
		action = "push"
	}
	if !denied {
		if info.project == "" {
			return audit.Event{}, false // refused before authentication, not by policy (a bad method)
		}
		switch rt.kind {
		case routeManifest:
			if r.Method == http.MethodHead {
				return audit.Event{}, false
			}
		case routeBlob:
			if r.Method == http.MethodHead {
				return audit.Event{}, false
			}
			if rg, ok := ParseRange(r.Header.Get("Range")); ok && rg.Start > 0 {
				return audit.Event{}, false // the rest of a download recorded at its start
			}
		case routeUploadStart:
			if status != http.StatusCreated {
				return audit.Event{}, false // an upload begins; its PUT is recorded
			}
		case routeUpload:
			if r.Method != http.MethodPut {
				return audit.Event{}, false
			}
		default:
			return audit.Event{}, false // tag lists and referrers: only refusals
		}
	}
	e := audit.Event{
		Project: info.project, TokenID: info.tokenID, Action: action,
		Upstream: info.upstream, Repository: info.repo, Secret: info.secret, Decision: audit.Allowed,
	}
	if denied {
		e.Decision = audit.Denied
	}
	if e.Upstream == "" {
		// Refused before the allowlist named the upstream: what the
		// client asked for.
		e.Upstream, e.Repository = printableName(rt.key), printableName(rt.rest)
	}
	digest := info.digest
	switch rt.kind {
	case routeManifest, routeBlob:
		e.Reference = rt.ref
	case routeUploadStart:
		// 201 to a POST: a monolithic upload (digest=) or a mount that
		// took (mount=); startUpload checked both are digests.
		if q := r.URL.Query(); q.Get("digest") != "" {
			digest = q.Get("digest")
		} else {
			digest = q.Get("mount")
		}
	}
	if info.err == nil && status >= 200 && status < 300 {
		e.Digest = digest
	}
	if info.err != nil {
		e.Reason = auditReason(info.err)
		if e.TokenID == "" && (errors.Is(info.err.Cause, ErrTokenExpired) || errors.Is(info.err.Cause, ErrTokenRevoked)) {
			// A token the store knows, refused: name it.
			e.TokenID = presentedTokenID(r)
		}
	}
	return e, true
}

// auditReason says why a request failed, in this package's words.
func auditReason(e *Error) string {
	if e.Code == CodeUnauthorized && e.Cause != nil {
		var rl *RateLimitError
		if errors.As(e.Cause, &rl) {
			return "too many failed logins"
		}
		return "authentication failed: " + authMessage(e.Cause, "")
	}
	msg := e.Message
	if e.Code != CodeDenied && e.Code != CodeUnauthorized {
		msg = e.Code + ": " + msg
	}
	return redact(msg)
}

// presentedTokenID is the id of the project token a request carries
// (Basic password or "Bearer pst_..."), or "".
func presentedTokenID(r *http.Request) string {
	tok := ""
	if _, pw, ok := r.BasicAuth(); ok {
		tok = pw
	} else if scheme, cred, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " "); ok && strings.EqualFold(scheme, "bearer") {
		tok = strings.TrimSpace(cred)
	}
	id, _ := ParseTokenID(tok)
	return id
}

// tokenAuditEvent is the event of a refused login at /token: credentials
// were presented and rejected (401), or the client hit the failed-login
// limit (429). A 401 to a request without credentials is the start of
// the Basic-auth exchange, not a refusal.
func tokenAuditEvent(r *http.Request, status int) (audit.Event, bool) {
	if status != http.StatusUnauthorized && status != http.StatusTooManyRequests {
		return audit.Event{}, false
	}
	var scopes []string
	presented := false
	switch r.Method {
	case http.MethodGet:
		_, pw, ok := r.BasicAuth()
		presented = ok && pw != ""
		scopes = r.URL.Query()["scope"]
	case http.MethodPost:
		// The token handler parsed the form on this same request.
		presented = r.PostForm.Get("password") != "" || r.PostForm.Get("refresh_token") != ""
		scopes = r.PostForm["scope"]
	}
	if !presented && status == http.StatusUnauthorized {
		return audit.Event{}, false
	}
	e := audit.Event{Action: "pull", Decision: audit.Denied,
		Reason: "login refused: the project token is invalid, expired or revoked"}
	if status == http.StatusTooManyRequests {
		e.Reason = "login refused: too many failed logins"
	}
	// No token id: the token server's answer does not tell an unknown
	// token from a revoked one, and an id an attacker made up would
	// mislead.
	if acc, err := ParseScopes(scopes); err == nil {
		for _, a := range acc {
			if a.Type != "repository" {
				continue
			}
			up, repo, _ := strings.Cut(a.Name, "/")
			e.Upstream, e.Repository = printableName(up), printableName(repo)
			for _, act := range a.Actions {
				if act == "push" || act == "*" {
					e.Action = "push"
				}
			}
			break
		}
	}
	return e, true
}

// KubeletAuditTo returns a WithKubeletAudit hook that records each
// kubelet credential request to l (failures to record go to log); nil when
// l is nil.
func KubeletAuditTo(l audit.Log, log *slog.Logger) func(KubeletAuditEvent) {
	if l == nil {
		return nil
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return func(ev KubeletAuditEvent) {
		recordAudit(context.Background(), l, log, kubeletAuditEvent(ev))
	}
}

// kubeletAuditEvent maps a kubelet API request to an audit event.
func kubeletAuditEvent(ev KubeletAuditEvent) audit.Event {
	e := audit.Event{
		Time: ev.Time.UTC(), Project: ev.Project, TokenID: ev.TokenID, Client: ev.Client,
		Action: audit.ActionCredential, Via: audit.ViaKubelet, Secret: ev.Secret,
		Status: ev.Status, Reason: ev.Reason,
	}
	if ev.Namespace != "" {
		e.Subject = "system:serviceaccount:" + ev.Namespace + ":" + ev.ServiceAccount
		if ev.Pod != "" {
			e.Subject += " pod " + ev.Pod
		}
	}
	if ref, err := name.ParseReference(strings.TrimSpace(ev.Image)); err == nil {
		e.Upstream = ref.Context().RegistryStr()
		if t, err := secret.ParseServerURL(e.Upstream); err == nil {
			e.Upstream = t.Host
		}
		e.Repository, e.Reference = ref.Context().RepositoryStr(), ref.Identifier()
	} else if ev.Image != "" {
		e.Reference = printableName(ev.Image)
	}
	switch ev.Outcome {
	case "credential":
		e.Decision = audit.Allowed
	case "pull-token":
		e.Decision = audit.Allowed
		if e.Reason == "" {
			e.Reason = "proxy pull token issued"
		}
	case "error":
		// Policy allowed it; resolving the credential failed.
		e.Decision = audit.Allowed
	default:
		e.Decision = audit.Denied
	}
	return e
}
