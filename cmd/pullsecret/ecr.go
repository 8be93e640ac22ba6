package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/awsecr"
)

const createECRUsage = `       pullsecret secret create NAME --ecr --registry ACCOUNT.dkr.ecr.REGION.amazonaws.com [--registry ...]
           [--aws-access-key-id ID --aws-secret-access-key-stdin | --aws-profile P]
           [--aws-role-arn ARN [--aws-external-id X]] [--aws-region R] [--project P]
`

const createECRFlagsUsage = `
ECR secrets (--ecr) hold an AWS identity, exchanged at pull time for a
12-hour registry token (ECR GetAuthorizationToken; ECR Public for
public.ecr.aws). With no keys and no profile, the AWS default chain is used
(environment, shared config, web identity, container or instance metadata).
  --ecr                          make an ECR secret
  --aws-access-key-id ID         access key id, with --aws-secret-access-key-stdin
  --aws-secret-access-key-stdin  read the secret access key from standard input
  --aws-profile P                a profile of the shared AWS config files
  --aws-role-arn ARN             assume this role (STS) for this secret's registries
  --aws-external-id X            the external id the role's trust policy requires
  --aws-region R                 region, for registries that are not ECR host
                                 names (a mirror or alias of one)
`

// ecrFlags are secret create's flags for ECR secrets.
type ecrFlags struct {
	ecr                  bool
	keyID                string
	secretStdin          bool
	profile, role, extID string
	region               string
	anySet               func() bool
}

func (e *ecrFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&e.ecr, "ecr", false, "")
	fs.StringVar(&e.keyID, "aws-access-key-id", "", "")
	fs.BoolVar(&e.secretStdin, "aws-secret-access-key-stdin", false, "")
	fs.StringVar(&e.profile, "aws-profile", "", "")
	fs.StringVar(&e.role, "aws-role-arn", "", "")
	fs.StringVar(&e.extID, "aws-external-id", "", "")
	fs.StringVar(&e.region, "aws-region", "", "")
	e.anySet = func() bool {
		set := false
		fs.Visit(func(f *flag.Flag) {
			if len(f.Name) > 4 && f.Name[:4] == "aws-" {
				set = true
			}
		})
		return set
	}
}

// check validates the flags of an ECR create (the value flags of the other
// kinds must be unset).
func (e *ecrFlags) check(vf *valueFlags, usage string) error {
	if !e.ecr {
		if e.anySet() {
			return &usageError{msg: "the --aws-* flags go with --ecr", usage: usage}
		}
		return nil
	}
	if vf.username != "" || vf.passwordStdin || vf.passwordFile != "" || vf.tokenStdin || vf.tokenFile != "" {
		return &usageError{msg: "an --ecr secret takes no --username, password or token: it holds an AWS identity", usage: usage}
	}
	if (e.keyID == "") != !e.secretStdin {
		return &usageError{msg: "give --aws-access-key-id together with --aws-secret-access-key-stdin", usage: usage}
	}
	return nil
}

// value reads the secret key (if any) and builds the sealed value.
func (e *ecrFlags) value(c *cli) (secret.Value, error) {
	a := &secret.AWSValue{AccessKeyID: e.keyID, Profile: e.profile, RoleARN: e.role, ExternalID: e.extID, Region: e.region}
	if e.secretStdin {
		k, err := c.readValue("AWS secret access key", true, "")
		if err != nil {
			return secret.Value{}, err
		}
		a.SecretAccessKey = k
	}
	return secret.Value{AWS: a}, nil
}

// ecrExchangeArg, as the only argument, runs serveECRExchange.
const ecrExchangeArg = secret.ECRExchangeArg

// serveECRExchange is the hidden command the credential helper runs to
// exchange an AWS identity for an ECR token (see secret.ExecExchanger): the
// helper itself links no AWS code, so that its start-up stays fast.
func serveECRExchange(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := secret.ServeECRExchange(ctx, awsecr.NewFromEnv(getenv), stdin, stdout); err != nil {
		fmt.Fprintln(stderr, "pullsecret:", err)
		return exitError
	}
	return exitOK
}
