package proxy_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/proxy"
)

// TestKubeletAudit: the kubelet API reports each request with the node's
// address, the status and the id of a pull token it issued; KubeletAuditTo
// records that in the trail, without any credential.
func TestKubeletAudit(t *testing.T) {
	t.Parallel()
	w := newKubWorld(t)
	cred := w.ask("ghcr.io/acme/app:v1", w.token(kubIssuerA, "team-a", "builder", nil))
	pt := w.ask(kubProxy+"/ghcr.io/acme/agent:1.4", w.token(kubIssuerA, "team-a", "builder", nil))
	refused := w.ask("ghcr.io/acme/app:v1", w.token(kubIssuerA, "team-a", "intruder", nil))
	if cred.status != 200 || pt.status != 200 || refused.status != 403 {
		t.Fatalf("statuses %d %d %d", cred.status, pt.status, refused.status)
	}
	ptID, ok := proxy.ParseTokenID(pt.resp.Password)
	if !ok {
		t.Fatal("the pull token has no id")
	}
	trail, err := audit.OpenFile(filepath.Join(t.TempDir(), audit.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer trail.Close()
	record := proxy.KubeletAuditTo(trail, nil)
	w.mu.Lock()
	for _, ev := range w.events {
		record(ev)
	}
	w.mu.Unlock()
	evs, err := trail.Query(context.Background(), audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 3 {
		t.Fatalf("%d events, want 3: %+v", len(evs), evs)
	}
	const sa = "system:serviceaccount:team-a:builder pod pod-1"
	for i, c := range []struct {
		decision              audit.Decision
		project, secret, repo string
		token                 string
		status                int
		subject               string
	}{
		{audit.Allowed, "alpha", "ghcr", "acme/app", "", 200, sa},
		{audit.Allowed, "alpha", "", "ghcr.io/acme/agent", ptID, 200, sa},
		{audit.Denied, "", "", "acme/app", "", 403, "system:serviceaccount:team-a:intruder pod pod-1"},
	} {
		e := evs[i]
		if e.Decision != c.decision || e.Project != c.project || e.Secret != c.secret || e.Repository != c.repo ||
			e.TokenID != c.token || e.Status != c.status || e.Subject != c.subject || e.Via != audit.ViaKubelet ||
			e.Client == "" {
			t.Errorf("event %d: %+v", i, e)
		}
	}
	if !strings.Contains(evs[2].Reason, "bound to no project") {
		t.Errorf("refusal reason %q", evs[2].Reason)
	}
	b, _ := os.ReadFile(trail.Path())
	for _, s := range []string{kubAlphaPW, kubBetaPW, pt.resp.Password} {
		if strings.Contains(string(b), s) {
			t.Errorf("the trail holds a credential (%.8s...)", s)
		}
	}
}
