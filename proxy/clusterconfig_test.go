package proxy

import (
	"strings"
	"testing"
	"time"
)

func TestClusterConfig(t *testing.T) {
	t.Parallel()
	const md = "metadata: {driver: postgres, dsn: 'postgres://u@db/p'}\n"
	for _, tc := range []struct {
		name, yaml string
		err        string // "" = valid
		replica    string // ReplicaName() when valid
		advertise  bool   // CheckAdvertise passes
	}{
		{name: "complete", yaml: md + "cluster: {replica_id: r1, advertise: 'http://10.0.0.5:5080', secret_file: /s}\n", replica: "r1", advertise: true},
		// A pod learns its IP only at start: serve --advertise fills it in.
		{name: "advertise left to the flag", yaml: md + "cluster: {replica_id: r1, secret_file: /s}\n", replica: "r1"},
		{name: "audit replica wins", yaml: md + "audit: {replica: a1}\ncluster: {replica_id: r1, secret_file: /s}\n", replica: "a1"},
		{name: "advertise not a URL", yaml: md + "cluster: {replica_id: r1, advertise: '10.0.0.5:5080', secret_file: /s}\n", err: "cluster.advertise"},
		{name: "no database", yaml: "cluster: {replica_id: r1, secret_file: /s}\n", err: "metadata.driver postgres"},
		{name: "no secret", yaml: md + "cluster: {replica_id: r1}\n", err: "cluster.secret_file"},
		{name: "replica id with a space", yaml: md + "cluster: {replica_id: 'a b', secret_file: /s}\n", err: "cluster.replica_id"},
		{name: "lease too short", yaml: md + "cluster: {replica_id: r1, secret_file: /s, lease_ttl: 10ms}\n", err: "cluster.lease_ttl"},
		{name: "negative shutdown delay", yaml: "shutdown_delay: -1s\n", err: "shutdown_delay"},
		{name: "huge shutdown delay", yaml: "shutdown_delay: 1h\n", err: "shutdown_delay"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ParseConfig([]byte(tc.yaml))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want one naming %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.ReplicaName(); got != tc.replica {
				t.Errorf("ReplicaName %q, want %q", got, tc.replica)
			}
			if err := cfg.Cluster.CheckAdvertise(); (err == nil) != tc.advertise {
				t.Errorf("CheckAdvertise: %v", err)
			}
			// serve --replica-id after parsing: the audit name follows
			// unless audit.replica was set.
			cfg.Cluster.ReplicaID = "flag"
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			if cfg.Audit.Replica == "" && cfg.ReplicaName() != "flag" {
				t.Errorf("after --replica-id the audit name is %q", cfg.ReplicaName())
			}
		})
	}
}

func TestShutdownDelayParsed(t *testing.T) {
	t.Parallel()
	cfg, err := ParseConfig([]byte("shutdown_delay: 5s\n"))
	if err != nil || cfg.ShutdownDelay != 5*time.Second {
		t.Fatalf("%v %v", cfg.ShutdownDelay, err)
	}
}

// FuzzParseConfig: any bytes give a config or an error, never a panic, and
// a config that parsed validates again unchanged (serve validates twice:
// after the file and after its flags).
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		"listen: 127.0.0.1:5080\nshutdown_delay: 5s\n",
		"metadata: {driver: postgres, dsn: 'postgres://u@db/p'}\ncluster: {replica_id: r1, secret_file: /s, lease_ttl: 2s}\n",
		"cache: {driver: s3-aws, parameters: {bucket: b, region: r, secretkey: '${S}'}, gc: {max_size: 1GiB, interval: 1h}}\n",
		"aliases: {hub: docker.io}\nprojects: {acme: {aliases: {gh: ghcr.io}}}\n",
		"audit: {enabled: false}\nkubelet: {issuers: []}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := ParseConfig(b)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("a parsed config fails its second validation: %v\n%s", err, b)
		}
	})
}
