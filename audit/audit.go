// Package audit records who obtained which credential and who pulled or
// pushed what through pullsecret, and answers queries over those records.
//
// A record answers the question security teams actually ask: who pulled
// what, with which secret, when. It names the project, the id of the
// project token used (never the token itself), the client address, the
// upstream, repository, reference and digest, and the decision with its
// reason. No credential value ever appears in an Event: Secret is a name,
// TokenID an id.
//
// Decision is about policy, not about the outcome of the transfer:
//
//   - Denied: pullsecret refused (authentication, token scope, repository
//     patterns, the project's upstream allowlist, the failed-login rate
//     limit), or the project has no pull secret for the target, or the
//     upstream refused the project's pull secret (401/403).
//   - Allowed: policy let the request through. Status and Reason then say
//     whether it succeeded: an upstream 404 or 502 is an allowed request
//     that failed.
package audit

import (
	"context"
	"time"
)

// Decision is the outcome of a request: it was served or it was refused.
type Decision string

// The two decisions an Event can carry.
const (
	Allowed Decision = "allowed"
	Denied  Decision = "denied"
)

// Actions an Event can record.
const (
	ActionPull       = "pull"
	ActionPush       = "push"
	ActionCredential = "credential"
)

// Channels through which a request reached pullsecret (Event.Via).
const (
	ViaProxy   = "proxy"
	ViaHelper  = "helper"
	ViaKubelet = "kubelet"
	ViaWarm    = "cache-warm" // pullsecret cache warm, run by an operator
)

// Event is one audited request.
type Event struct {
	Time       time.Time `json:"time"`
	Replica    string    `json:"replica,omitempty"`
	Project    string    `json:"project"`
	TokenID    string    `json:"token_id,omitempty"`
	Client     string    `json:"client,omitempty"` // remote address
	Action     string    `json:"action"`           // "pull", "push", "credential"
	Via        string    `json:"via"`              // "proxy", "helper", "kubelet", "cache-warm"
	Upstream   string    `json:"upstream,omitempty"`
	Repository string    `json:"repository,omitempty"`
	Reference  string    `json:"reference,omitempty"` // tag or digest asked for
	Digest     string    `json:"digest,omitempty"`    // digest served
	Secret     string    `json:"secret,omitempty"`    // name of the pull secret used (never its value)
	Decision   Decision  `json:"decision"`
	Reason     string    `json:"reason,omitempty"`
	// Status is the HTTP status the client got (0 when unknown).
	Status int `json:"status,omitempty"`
	// Subject names who asked when it was not a project token: the
	// Kubernetes service account (and pod) of a kubelet request.
	Subject string `json:"subject,omitempty"`
}

// Filter selects events in Query. Zero fields do not filter.
//
// Query returns the matching events oldest first; with Limit > 0, only the
// Limit most recent of them (still oldest first), as tail(1) would.
type Filter struct {
	Project string    // only this project
	Since   time.Time // only events at or after this time
	Denied  bool      // only denied events
	Limit   int       // at most this many, the most recent ones; <= 0 means all
}

// Match reports whether e passes the filter's predicates (Limit aside).
func (f Filter) Match(e Event) bool {
	if f.Project != "" && e.Project != f.Project {
		return false
	}
	if !f.Since.IsZero() && e.Time.Before(f.Since) {
		return false
	}
	if f.Denied && e.Decision != Denied {
		return false
	}
	return true
}

// Log records and queries events. Implementations: File (JSON lines) here,
// PostgreSQL elsewhere.
//
// Record is called on the request path: an implementation should queue
// rather than wait for storage, and must be safe for concurrent use. A zero
// Event.Time is set to the time of the call.
type Log interface {
	Record(ctx context.Context, e Event) error
	Query(ctx context.Context, f Filter) ([]Event, error)
}

// WithReplica returns a Log that stamps every event it records with the
// name of this server replica (when the event names none), so that
// replicas sharing one store can be told apart.
func WithReplica(l Log, replica string) Log {
	if replica == "" {
		return l
	}
	return replicaLog{Log: l, replica: replica}
}

type replicaLog struct {
	Log
	replica string
}

func (r replicaLog) Record(ctx context.Context, e Event) error {
	if e.Replica == "" {
		e.Replica = r.replica
	}
	return r.Log.Record(ctx, e)
}
