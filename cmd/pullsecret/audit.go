package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/postgres"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

func auditCommand() *command {
	return &command{
		summary: "Show the audit trail: who pulled what, with which token and secret, when",
		usage:   auditUsage,
		run:     (*cli).audit,
	}
}

const auditUsage = `Usage: pullsecret audit [--project P] [--since D] [--denied] [--limit N] [-o table|json]

Show the audit trail that 'pullsecret serve' records: every credential it
handed out (helper remote mode, kubelet plugin) and every pull and push
through the proxy, refused ones included, oldest first. Tokens appear by id
and pull secrets by name, never their values. A pull is one manifest GET
(by tag or digest) plus one event per blob.

DECISION is denied when pullsecret refused (authentication, token scope,
repository patterns, a project's upstream allowlist) or the upstream refused
the project's pull secret; an allowed request that failed upstream (404,
502) shows why in REASON.

Flags:
  --project P           only the events of project P
  --since D             only events since D: a duration back from now (90m,
                        24h, 7d) or a time (RFC 3339, or a UTC date 2026-01-31)
  --denied              only refused requests
  --limit N             only the N most recent matching events (default: all)
  -o, --output FORMAT   table (default) or json (one JSON object per line)
  --config FILE         the server's config file (default: $PULLSECRET_CONFIG):
                        its audit.path and home, or with metadata driver
                        postgres the database's audit table
  --home DIR            data folder (default: $PULLSECRET_HOME)
`

func (c *cli) audit(args []string) error {
	fs := newFlagSet("audit")
	var project, since, cfgFile, home string
	fs.StringVar(&project, "project", "", "")
	fs.StringVar(&since, "since", "", "")
	fs.StringVar(&cfgFile, "config", "", "")
	fs.StringVar(&home, "home", "", "")
	denied := fs.Bool("denied", false, "")
	limit := fs.Int("limit", 0, "")
	out := outputFlag(fs, "table")
	pos, err := c.parseFlags(fs, args, auditUsage)
	if err != nil {
		return err
	}
	if err := noArgs(pos, auditUsage); err != nil {
		return err
	}
	if err := checkOutput(*out, auditUsage, "table", "json"); err != nil {
		return err
	}
	if *limit < 0 {
		return &usageError{msg: "--limit must be a positive number", usage: auditUsage}
	}
	flt := audit.Filter{Project: project, Denied: *denied, Limit: *limit}
	if project != "" {
		if err := secret.ValidName(project); err != nil {
			return fmt.Errorf("project: %w", err)
		}
	}
	if since != "" {
		if flt.Since, err = parseSince(since, time.Now()); err != nil {
			return &usageError{msg: err.Error(), usage: auditUsage}
		}
	}
	cfg := proxy.DefaultConfig()
	if cfgFile == "" {
		cfgFile = c.getenv("PULLSECRET_CONFIG")
	}
	if cfgFile != "" {
		if cfg, err = proxy.LoadConfig(cfgFile); err != nil {
			return err
		}
	}
	if home == "" {
		home = c.home
	}
	if home != "" {
		cfg.Home = home
	}
	events, err := c.queryAudit(cfg, flt)
	if err != nil {
		return err
	}
	if *out == "json" {
		enc := json.NewEncoder(c.stdout)
		for _, e := range events {
			if err := enc.Encode(e); err != nil {
				return err
			}
		}
		return nil
	}
	return writeAuditTable(c.stdout, events)
}

// queryAudit reads the trail the server configured by cfg records: the
// database's audit table with metadata driver postgres, else the file.
func (c *cli) queryAudit(cfg proxy.Config, flt audit.Filter) ([]audit.Event, error) {
	if cfg.Metadata.Driver == proxy.MetadataPostgres {
		if !cfg.Audit.Enabled {
			return nil, errors.New("the audit trail is disabled in this configuration (audit.enabled: false)")
		}
		db, err := c.commandMetadata(cfg)
		if err != nil {
			return nil, err
		}
		a := db.OpenAuditLog()
		defer a.Close()
		return a.Query(c.ctx, flt)
	}
	path, err := c.auditPath(cfg)
	if err != nil {
		return nil, err
	}
	events, skipped, err := audit.ReadFile(c.ctx, path, flt)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no audit trail at %s: 'pullsecret serve' creates it when it starts with audit enabled (give its --config or --home)", path)
	}
	if err != nil {
		return nil, err
	}
	if skipped > 0 {
		fmt.Fprintf(c.stderr, "note: skipped %d unreadable line(s) of %s (a write cut short by a crash or a full disk)\n", skipped, path)
	}
	return events, nil
}

// auditPath is where the embedded mode keeps the trail: audit.path, else
// audit.jsonl in the data folder.
func (c *cli) auditPath(cfg proxy.Config) (string, error) {
	if !cfg.Audit.Enabled {
		return "", errors.New("the audit trail is disabled in this configuration (audit.enabled: false)")
	}
	if cfg.Audit.Path != "" {
		return cfg.Audit.Path, nil
	}
	home := cfg.Home
	if home == "" {
		var err error
		if home, err = secret.HomeFromEnv(c.getenv); err != nil {
			return "", err
		}
	}
	return filepath.Join(home, audit.FileName), nil
}

// openAuditLog opens the trail `serve` records to: the table of db (the
// metadata database, when the config names one), else the file; a nil Log
// when audit.enabled is false. Close the closer after the server stopped:
// it writes what is still queued.
func (c *cli) openAuditLog(cfg proxy.Config, home string, db *postgres.DB, log *slog.Logger) (audit.Log, io.Closer, error) {
	if !cfg.Audit.Enabled {
		log.Warn("the audit trail is disabled (audit.enabled: false)")
		return nil, nil, nil
	}
	if db != nil {
		a := db.OpenAuditLog()
		return audit.WithReplica(a, cfg.ReplicaName()), a, nil
	}
	cfg.Home = home
	path, err := c.auditPath(cfg)
	if err != nil {
		return nil, nil, err
	}
	f, err := audit.OpenFile(path, audit.WithLogger(log))
	if err != nil {
		return nil, nil, err
	}
	closer := closerFunc(func() error {
		err := f.Close()
		if err != nil {
			log.Error("audit trail: closing failed; the last events may be lost", "path", path, "err", err)
		}
		return err
	})
	return audit.WithReplica(f, cfg.ReplicaName()), closer, nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// parseSince reads --since: a duration back from now ("90m", "24h", "7d")
// or a point in time (RFC 3339, or a date, taken as midnight UTC).
func parseSince(s string, now time.Time) (time.Time, error) {
	if n, ok := strings.CutSuffix(s, "d"); ok {
		if d, err := strconv.Atoi(n); err == nil && d >= 0 && d <= 100*366 {
			return now.Add(-time.Duration(d) * 24 * time.Hour), nil
		}
	}
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("invalid --since %q: want a duration (90m, 24h, 7d) or a time (2026-01-31 or RFC 3339)", printable(s))
}

// writeAuditTable prints events as a table, one line each.
func writeAuditTable(w io.Writer, events []audit.Event) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tPROJECT\tTOKEN\tCLIENT\tACTION\tUPSTREAM/REPOSITORY\tDIGEST\tSECRET\tDECISION\tREASON")
	for _, e := range events {
		action := e.Action
		if e.Via != "" && e.Via != audit.ViaProxy {
			action += " (" + e.Via + ")"
		}
		who := e.TokenID
		if who == "" && e.Subject != "" {
			who = e.Subject
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			e.Time.UTC().Format(time.RFC3339), cell(e.Project), cell(who), cell(e.Client), cell(action),
			cell(auditTarget(e)), cell(shortDigest(e.Digest)), cell(e.Secret), cell(string(e.Decision)), cell(e.Reason))
	}
	return tw.Flush()
}

// auditTarget is "upstream/repository" with the tag asked for, or the
// digest asked for when none was served.
func auditTarget(e audit.Event) string {
	t := e.Upstream
	if e.Repository != "" {
		t += "/" + e.Repository
	}
	switch {
	case e.Reference == "":
	case !strings.Contains(e.Reference, ":"):
		t += ":" + e.Reference
	case e.Digest == "":
		t += "@" + shortDigest(e.Reference)
	}
	return t
}

// shortDigest keeps an algorithm and 12 hex digits, as docker does.
func shortDigest(d string) string {
	if alg, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return alg + ":" + hex[:12]
	}
	return d
}

// cell makes a table cell of s: "-" when empty, control characters and
// tabs replaced.
func cell(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}
